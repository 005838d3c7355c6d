"""``python -m bench [op|kernels|overhead|loading|generation|overlap|sp|quant|all] [--quick]``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from bench.common import Target, print_targets

BENCHMARKS = ("op", "kernels", "overhead", "loading", "generation", "overlap", "sp", "quant")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks, then print every target with PASS / SHORT."""
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("which", nargs="?", default="all", choices=[*BENCHMARKS, "all"])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    args = ap.parse_args(argv)
    names = BENCHMARKS if args.which == "all" else (args.which,)
    targets: list[Target] = []
    t0 = time.perf_counter()
    for name in names:
        t1 = time.perf_counter()
        mod = importlib.import_module(f"bench.{name}")
        targets += mod.run(quick=args.quick)
        print(f"-- {name}: {time.perf_counter() - t1:.0f} s", flush=True)
    print(f"\n== targets ({time.perf_counter() - t0:.0f} s total)")
    print_targets(targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
