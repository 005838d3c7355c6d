"""op: portable ``mm_all_reduce_base`` vs the hand-written ``local matmul; dist.all_reduce``.

TP = 2 (two spawned gloo processes, one torch thread each). Per scheme the baseline is what a
user would write by hand: FP ``torch.matmul(x1, x2)``, W8A16 ``kernels.weight_quant_matmul``,
W8A8 ``kernels.quant_matmul`` (the same scheme's local kernel), then ``dist.all_reduce``.
Both sides get the same tensors; weights are (n, k) storage seen as (k, n), the layout the layers
keep on CPU (tp_layers.methods). Shapes are per rank: m in {1, 16, 128, 2048}, k = 2048 (k = 4096 over 2 ranks), n = 4096, and
the vendor doc's x1 [128, 512], x2 [512, 64]. Target: fused <= 1.05x the hand-written time.
"""

from __future__ import annotations

import time
from statistics import median_high
from typing import Any

from bench.common import (
    Ratio,
    Target,
    interleaved,
    operands,
    plot_bars,
    print_table,
    print_targets,
    ratio,
    run_ranks,
    save_results,
)

SCHEMES = ("fp_bf16", "w8a16", "w8a8")
GOAL = 1.05


def shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(m, k per rank, n)."""
    ms = (1, 128) if quick else (1, 16, 128, 2048)
    return [(m, 2048, 4096) for m in ms] + [(128, 512, 64)]


def _inputs(scheme: str, m: int, k: int, n: int, rank: int) -> tuple[Any, Any, dict, Any]:
    """(x1, x2, op kwargs, baseline local fn) for one scheme and shape."""
    import torch

    from ascend_ops import kernels

    if scheme == "fp_bf16":
        x1, x2, _ = operands(scheme, m, k, n, rank)
        return x1, x2, {}, lambda: torch.matmul(x1, x2)
    if scheme == "w8a16":
        g = torch.Generator().manual_seed(1000 + rank)
        x1 = torch.randn(m, k, generator=g).bfloat16()
        w = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
        x2 = kernels.prepare_w8a16_weight(w)
        s = (torch.rand(n, generator=g) * 0.01 + 1e-3).bfloat16()
        return x1, x2, {"antiquant_scale": s}, lambda: kernels.weight_quant_matmul(x1, x2, s)
    x1, x2, g = operands(scheme, m, k, n, rank)
    s = (torch.rand(n, generator=g) * 1e-4 + 1e-5).bfloat16()
    return (
        x1,
        x2,
        {"dequant_scale": s},
        lambda: kernels.quant_matmul(x1, x2, s, output_dtype=torch.bfloat16),
    )


def _agreed_iters(fn: Any, budget_s: float) -> int:
    """Calls per timed block so that one block takes ~budget_s (max over ranks)."""
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    it = torch.tensor([max(1, min(200, int(budget_s / max(dt, 1e-6))))])
    dist.all_reduce(it, op=dist.ReduceOp.MAX)
    return int(it)


def rank_body(rank: int, ws: int, quick: bool) -> list[dict]:
    """Runs on every rank; returns rank-local timings (rank 0's are reported)."""
    import torch.distributed as dist

    import ascend_ops

    hcom = ascend_ops.hcom_name()
    rows = []
    for scheme in SCHEMES:
        for m, k, n in shapes(quick):
            x1, x2, kw, local = _inputs(scheme, m, k, n, rank)

            def fused(x1: Any = x1, x2: Any = x2, kw: dict = kw) -> Any:
                return ascend_ops.mm_all_reduce_base(x1, x2, hcom, **kw)

            def by_hand(local: Any = local) -> Any:
                y = local()
                dist.all_reduce(y)
                return y

            iters = _agreed_iters(fused, 0.05)
            repeats = 3 if m >= 2048 else (5 if quick else 9)
            t = interleaved(
                {"fused": fused, "by_hand": by_hand},
                repeats,
                iters,
                sync=dist.barrier,
            )
            r = ratio(t["fused"], t["by_hand"])
            rows.append(
                {
                    "scheme": scheme,
                    "m": m,
                    "k_per_rank": k,
                    "n": n,
                    "iters": iters,
                    "fused_ms": [v * 1e3 for v in t["fused"]],
                    "by_hand_ms": [v * 1e3 for v in t["by_hand"]],
                    "ratio": r.as_dict(),
                }
            )
    return rows


def run(quick: bool = False) -> list[Target]:
    """Measure, print the table and targets, write bench/results/op.{json,png}."""
    rows = run_ranks("bench.op:rank_body", 2, quick, threads=1)[0]
    table, targets = [], []
    for row in rows:
        r = Ratio.from_dict(row["ratio"])
        med, base = median_high(row["fused_ms"]), median_high(row["by_hand_ms"])
        table.append(
            (row["scheme"], row["m"], row["k_per_rank"], row["n"], f"{med:.3f}", f"{base:.3f}", r)
        )
    print_table(
        "op: fused mm_all_reduce_base vs matmul + dist.all_reduce (TP=2 gloo, 1 thread/rank)",
        ("scheme", "m", "k/rank", "n", "fused ms", "by hand ms", "ratio [min-max]"),
        table,
    )
    for scheme in SCHEMES:
        mine = [t for t in table if t[0] == scheme]
        worst = max(mine, key=lambda t: t[-1].median)
        targets.append(
            Target(
                f"op {scheme}: fused / hand-written (worst shape m={worst[1]} k={worst[2]} n={worst[3]})",
                worst[-1],
                "<=",
                GOAL,
            )
        )
    print_targets(targets)
    groups = sorted({f"m{t[1]} k{t[2]} n{t[3]}" for t in table}, key=lambda s: (len(s), s))
    series: dict[str, list[float]] = {}
    errors: dict[str, list[tuple[float, float]]] = {}
    for scheme in SCHEMES:
        by = {f"m{t[1]} k{t[2]} n{t[3]}": t[-1] for t in table if t[0] == scheme}
        series[scheme] = [by[g].median for g in groups]
        errors[scheme] = [(by[g].lo, by[g].hi) for g in groups]
    plot_bars(
        "op",
        "fused / hand-written time (TP=2 gloo; dashed: 1.05 goal)",
        groups,
        series,
        "time ratio",
        errors=errors,
        hline=GOAL,
    )
    save_results("op", {"quick": quick, "rows": rows}, targets)
    return targets
