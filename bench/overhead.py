"""overhead: the op's validation + dispatch at tiny shapes vs the raw kernels (world size 1).

Per scheme, ``ascend_ops.mm_all_reduce_base`` (hcom = LOCAL_HCOM: no collective) against the
kernel it ends in, called directly: ``torch.matmul`` (FP), ``torch._weight_int8pack_mm``
(W8A16) and ``torch._int_mm`` + the float32 dequantization (W8A8); one torch thread, no grad.
The median over repeats of (op - raw) is the per-call overhead; target <= 30 us.
"""

from __future__ import annotations

import statistics

from bench.common import Target, interleaved, plot_bars, print_table, print_targets, save_results

GOAL_US = 30.0


def _cases() -> dict[str, tuple]:
    """scheme -> (op callable, raw-kernel callable)."""
    import torch

    import ascend_ops
    from ascend_ops import kernels

    h = ascend_ops.hcom_name()
    g = torch.Generator().manual_seed(0)
    m, k, n = 4, 64, 32
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16().t()
    wq = kernels.prepare_w8a16_weight(
        torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    )
    s = torch.rand(n, generator=g).bfloat16()
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    ds = torch.rand(n, generator=g).bfloat16()
    ds32 = ds.float().reshape(1, n)
    wqt = wq.t()
    return {
        "fp_bf16": (
            lambda: ascend_ops.mm_all_reduce_base(x, w, h),
            lambda: torch.matmul(x, w),
        ),
        "w8a16": (
            lambda: ascend_ops.mm_all_reduce_base(x, wq, h, antiquant_scale=s),
            lambda: torch._weight_int8pack_mm(x, wqt, s),
        ),
        "w8a8": (
            lambda: ascend_ops.mm_all_reduce_base(xq, wq, h, dequant_scale=ds),
            lambda: (torch._int_mm(xq, wq).float() * ds32).to(torch.bfloat16),
        ),
    }


def run(quick: bool = False) -> list[Target]:
    """Measure, print, write bench/results/overhead.{json,png}."""
    import torch

    iters = 1000 if quick else 2000
    repeats = 9 if quick else 21
    rows, targets = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: no intra-op threading, less noise on a shared host
    try:
        cases = _cases()
        with torch.no_grad():
            timings = {
                name: interleaved({"op": op, "raw": raw}, repeats, iters, warmup=200)
                for name, (op, raw) in cases.items()
            }
    finally:
        torch.set_num_threads(threads)
    for name, t in timings.items():
        diffs = [(a - b) * 1e6 for a, b in zip(t["op"], t["raw"])]
        d = statistics.median(diffs)
        rows.append(
            {
                "scheme": name,
                "op_us": [v * 1e6 for v in t["op"]],
                "raw_us": [v * 1e6 for v in t["raw"]],
                "overhead_us": {"median": d, "min": min(diffs), "max": max(diffs)},
            }
        )
        targets.append(
            Target(
                f"overhead {name}: op validation + dispatch per call (m=4 k=64 n=32)",
                d,
                "<=",
                GOAL_US,
                unit=" us",
                note=f"spread {min(diffs):.1f}..{max(diffs):.1f} us",
            )
        )
    print_table(
        "overhead: op vs raw kernel, world size 1, us per call (median of repeats)",
        ("scheme", "op us", "raw us", "overhead us [min-max]"),
        [
            (
                r["scheme"],
                f"{statistics.median(r['op_us']):.1f}",
                f"{statistics.median(r['raw_us']):.1f}",
                f"{r['overhead_us']['median']:.1f} [{r['overhead_us']['min']:.1f}-{r['overhead_us']['max']:.1f}]",
            )
            for r in rows
        ],
    )
    print_targets(targets)
    plot_bars(
        "overhead",
        f"op overhead per call over the raw kernel (us; dashed: {GOAL_US:.0f} us goal)",
        [r["scheme"] for r in rows],
        {"overhead": [r["overhead_us"]["median"] for r in rows]},
        "us / call",
        errors={"overhead": [(r["overhead_us"]["min"], r["overhead_us"]["max"]) for r in rows]},
        hline=GOAL_US,
    )
    save_results("overhead", {"quick": quick, "rows": rows}, targets)
    return targets
