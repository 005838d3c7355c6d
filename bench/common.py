"""Shared benchmark machinery: interleaved timing (ratios against a baseline measured in the same
run, median of repeats with the spread), targets with PASS/SHORT, JSON + PNG results, and a
spawner for multi-rank (gloo) runs.

The machine is shared: every comparison interleaves the candidate and its baseline repeat by
repeat, and reports the median of the per-repeat ratios with their min..max.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

__all__ = [
    "RESULTS",
    "Ratio",
    "Target",
    "interleaved",
    "operands",
    "plot_bars",
    "print_table",
    "print_targets",
    "ratio",
    "run_ranks",
    "save_results",
]


@dataclasses.dataclass
class Ratio:
    """Median of per-repeat ratios a_i / b_i, with the min and max over repeats."""

    median: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x [{self.lo:.2f}-{self.hi:.2f}]"

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.lo, "max": self.hi}

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> Ratio:
        """The inverse of ``as_dict``."""
        return cls(d["median"], d["min"], d["max"])


def ratio(a: Sequence[float], b: Sequence[float]) -> Ratio:
    """Per-repeat ratios a_i / b_i of two interleaved series."""
    rs = [x / y for x, y in zip(a, b) if y > 0]
    return Ratio(statistics.median(rs), min(rs), max(rs))


def operands(scheme: str, m: int, k: int, n: int, rank: int) -> tuple[Any, Any, Any]:
    """Seeded per-rank operands: (x (m, k), w (k, n), the generator for further draws), w a
    transposed view of (n, k) storage as the layers keep weights on CPU (tp_layers.methods).
    ``"fp_bf16"``: bf16 randn, w scaled by 1 / sqrt(k); ``"w8a8"``: int8 in [-127, 127]."""
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    if scheme == "fp_bf16":
        x = torch.randn(m, k, generator=g).bfloat16()
        return x, (torch.randn(n, k, generator=g) / k**0.5).bfloat16().t(), g
    if scheme == "w8a8":
        x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        return x, torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).t(), g
    raise ValueError(f"scheme: expected 'fp_bf16' or 'w8a8', got {scheme!r}")


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    iters: int = 1,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, ``repeats`` samples each (mean of ``iters`` calls), the
    fns alternating inside every repeat (order rotated) so that load changes hit all alike.
    ``sync`` (e.g. a barrier) runs before each timed block."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            out[name].append((time.perf_counter() - t0) / iters)
    return out


@dataclasses.dataclass
class Target:
    """One goal: ``measured`` (a Ratio or a number) compared to ``goal`` by ``op``."""

    name: str
    measured: Ratio | float
    op: str  # "<=" or ">="
    goal: float
    unit: str = "x"
    note: str = ""

    @property
    def value(self) -> float:
        return self.measured.median if isinstance(self.measured, Ratio) else float(self.measured)

    @property
    def passed(self) -> bool:
        return self.value <= self.goal if self.op == "<=" else self.value >= self.goal

    def as_dict(self) -> dict[str, Any]:
        m = self.measured.as_dict() if isinstance(self.measured, Ratio) else self.measured
        return {
            "target": self.name,
            "measured": m,
            "goal": f"{self.op} {self.goal}{self.unit}",
            "status": "PASS" if self.passed else "SHORT",
            "note": self.note,
        }


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def print_targets(targets: Sequence[Target]) -> None:
    """Every target with its measured value and PASS/SHORT."""
    for t in targets:
        meas = str(t.measured) if isinstance(t.measured, Ratio) else f"{t.value:.3g}{t.unit}"
        status = "PASS " if t.passed else "SHORT"
        note = f"  ({t.note})" if t.note else ""
        print(f"  [{status}] {t.name}: {meas} (goal {t.op} {t.goal}{t.unit}){note}")
    sys.stdout.flush()


def save_results(name: str, payload: dict[str, Any], targets: Sequence[Target] = ()) -> Path:
    """Write bench/results/<name>.json (payload + targets + host info); returns its path."""
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg_1min": os.getloadavg()[0],
        },
        "targets": [t.as_dict() for t in targets],
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


def plot_bars(
    name: str,
    title: str,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    *,
    errors: dict[str, Sequence[tuple[float, float]]] | None = None,
    hline: float | None = None,
    logy: bool = False,
) -> Path:
    """Grouped bar chart -> bench/results/<name>.png (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(
        figsize=(min(12.0, max(6.0, 0.9 * len(groups) * max(1, len(series)))), 4.5)
    )
    width = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        yerr = None
        if errors and label in errors:
            lo_hi = errors[label]
            yerr = [
                [max(v - lo, 0) for v, (lo, _) in zip(vals, lo_hi)],
                [max(hi - v, 0) for v, (_, hi) in zip(vals, lo_hi)],
            ]
        ax.bar(xs, vals, width, label=label, yerr=yerr, capsize=2)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.8, ls="--")
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- multi-rank runs -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    fn_path: str, rank: int, ws: int, port: int, threads: int, args: tuple, q: mp.Queue
) -> None:
    try:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        import importlib

        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        if ws > 1:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=ws,
                timeout=datetime.timedelta(seconds=600),
            )
        mod_name, fn_name = fn_path.rsplit(":", 1)
        fn = getattr(importlib.import_module(mod_name), fn_name)
        out = fn(rank, ws, *args)
        if ws > 1:
            dist.barrier()
            dist.destroy_process_group()
        q.put((rank, True, out))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn_path: str, world_size: int, *args: Any, threads: int = 1, timeout: float = 1800
) -> list[Any]:
    """Run ``module:function(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks
    (``threads`` torch threads each); returns the per-rank results (rank order)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn_path, r, world_size, port, threads, args, q))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            rank, ok, out = q.get(timeout=max(1.0, deadline - time.monotonic()))
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{out}")
            results[rank] = out
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
