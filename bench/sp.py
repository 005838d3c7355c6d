"""sp: the sequence-parallel MC2 ops, measured (portable backend) and modelled (Atlas A2).

Measured, TP = 2 (two spawned gloo processes, one torch thread each): the portable fused ops
against what a user writes by hand, same tensors, interleaved repeats, ratios of the same run:

- ``all_gather_base_mm(x, w, hcom, 2, gather_output=False)`` vs ``dist.all_gather_single``
  + the local matmul (FP: ``torch.matmul``; W8A8: a second gather for the per-token scales, then
  ``kernels.quant_matmul``); x: (m, 2048) per rank, w: (2048, 2048) (a 4096-wide column layer);
- ``mm_reduce_scatter_base(x, w, hcom, 2)`` vs the local matmul + ``dist.reduce_scatter_single``;
  x: (m, 2048) (k = 4096 over 2 ranks), w: (2048, 4096).

Weights are (n, k) storage seen as (k, n), as the layers keep them on CPU. Target: fused <= 1.05x
the hand-written time (the fused op may not cost more than its pieces); a second baseline uses the
op's own local kernel (FP: ``kernels.fp_matmul``, the single-rounding fp32-accumulation formula;
its result must equal the fused op's bit for bit), so the two ratios separate the op's overhead
from the choice of FP GEMM. On this backend the fused
op is the same collective + matmul (nothing overlaps on CPU): the ratio measures the op's own
overhead (validation, dispatch, the scale gather), not the Ascend kernel's overlap, which the
model below estimates (bench/overlap_sp.py, a MODEL from the CANN tiling sources).
"""

from __future__ import annotations

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

SCHEMES = ("fp_bf16", "w8a8")
GOAL = 1.05
K = 2048


def shapes(quick: bool) -> list[tuple[str, int, int]]:
    """(op, m, n): m = rows per rank (ag) or rows of every rank's input (rs)."""
    ag = (16, 128) if quick else (16, 128, 512)
    rs = (32, 256) if quick else (32, 256, 1024)
    return [("ag", m, 2048) for m in ag] + [("rs", m, 4096) for m in rs]


def _case(op: str, scheme: str, m: int, n: int, rank: int) -> tuple[Any, Any, Any]:
    """(fused, hand-written, hand-written with the op's own local kernel) for one op, scheme
    and shape on this rank (FP: torch.matmul vs kernels.fp_matmul; W8A8: the same kernel)."""
    import torch
    import torch.distributed as dist

    import ascend_ops
    from ascend_ops import kernels

    hcom, ws = ascend_ops.hcom_name(), dist.get_world_size()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    x, w, g = operands(scheme, m, K, n, rank)
    if scheme == "fp_bf16":
        kw: dict = {}

        def local(a: Any, scale: Any = None) -> Any:
            return torch.matmul(a, w)

        def local_same(a: Any, scale: Any = None) -> Any:
            return kernels.fp_matmul(a, w)

    else:
        s1 = torch.rand(m, 1, generator=g) * 0.01 + 1e-3
        s2 = torch.rand(1, n, generator=g) * 1e-4 + 1e-5
        kw = {"x1_scale": s1, "x2_scale": s2, "comm_mode": "aiv"}

        def local(a: Any, scale: Any = s1) -> Any:
            return kernels.quant_matmul(
                a, w, s2.reshape(-1), pertoken_scale=scale.reshape(-1), output_dtype=torch.bfloat16
            )

        local_same = local

    if op == "ag":

        def fused() -> Any:
            return ascend_ops.all_gather_base_mm(x, w, hcom, ws, gather_output=False, **kw)[0]

        def by_hand(mm: Any = local) -> Any:
            xs = x.new_empty((m * ws, K))
            gather(xs, x)
            if "x1_scale" not in kw:
                return mm(xs)
            ss = kw["x1_scale"].new_empty((m * ws, 1))
            gather(ss, kw["x1_scale"])
            return mm(xs, ss)

        return fused, by_hand, lambda: by_hand(local_same)

    def fused_rs() -> Any:
        return ascend_ops.mm_reduce_scatter_base(x, w, hcom, ws, **kw)

    def by_hand_rs(mm: Any = local) -> Any:
        y = mm(x)
        out = y.new_empty((m // ws, n))
        scatter(out, y)
        return out

    return fused_rs, by_hand_rs, lambda: by_hand_rs(local_same)


def rank_body(rank: int, ws: int, quick: bool) -> list[dict]:
    """Runs on every rank; returns rank-local timings (rank 0's are reported)."""
    import torch
    import torch.distributed as dist

    from bench.op import _agreed_iters

    rows = []
    with torch.no_grad():
        for scheme in SCHEMES:
            for op, m, n in shapes(quick):
                fused, by_hand, same = _case(op, scheme, m, n, rank)
                ok = torch.equal(fused(), same())
                iters = _agreed_iters(fused, 0.05)
                t = interleaved(
                    {"fused": fused, "by_hand": by_hand, "same_kernel": same},
                    5 if quick else 9,
                    iters,
                    sync=dist.barrier,
                )
                rows.append(
                    {
                        "op": op,
                        "scheme": scheme,
                        "m": m,
                        "k": K,
                        "n": n,
                        "iters": iters,
                        "same_result": ok,
                        "fused_ms": [v * 1e3 for v in t["fused"]],
                        "by_hand_ms": [v * 1e3 for v in t["by_hand"]],
                        "same_kernel_ms": [v * 1e3 for v in t["same_kernel"]],
                        "ratio": ratio(t["fused"], t["by_hand"]).as_dict(),
                        "ratio_same_kernel": ratio(t["fused"], t["same_kernel"]).as_dict(),
                    }
                )
    return rows


def _model_tables() -> list[dict]:
    from bench import overlap_sp

    table = overlap_sp.sp_table()
    ms = sorted({m for r in table for m in r["speedup_pct"]})
    for key, what in (
        ("speedup_pct", "expected (kappa = 0, no growth)"),
        ("speedup_pct_grown", "pessimistic (tiling's comm growth factors applied)"),
    ):
        print_table(
            f"sp overlap MODEL, Atlas A2 bf16: fused speedup (%) over unfused by tokens M, {what}",
            (
                "layer",
                "op",
                "TP",
                *(f"M={m}" for m in ms),
                "pays>=5% from" if key == "speedup_pct" else "",
            ),
            [
                (
                    r["layer"],
                    "AG+MM" if r["kind"] == "ag" else "MM+RS",
                    r["tp"],
                    *(r[key].get(m, "-") for m in ms),
                    r["pays_from_m"] if key == "speedup_pct" else "",
                )
                for r in table
            ],
        )
    return table


def run(quick: bool = False) -> list[Target]:
    """Measure, print the tables and targets, write bench/results/sp.{json,png}."""
    rows = run_ranks("bench.sp:rank_body", 2, quick, threads=1)[0]
    table, targets = [], []
    for row in rows:
        r = Ratio.from_dict(row["ratio"])
        rs = row["ratio_same_kernel"]
        table.append(
            (
                "all_gather_base_mm" if row["op"] == "ag" else "mm_reduce_scatter_base",
                row["scheme"],
                row["m"],
                row["k"],
                row["n"],
                f"{median_high(row['fused_ms']):.3f}",
                f"{median_high(row['by_hand_ms']):.3f}",
                r,
                Ratio.from_dict(rs),
                "yes" if row["same_result"] else "NO",
            )
        )
    print_table(
        "sp: fused op vs hand-written collective + matmul (portable, TP=2 gloo, 1 thread/rank)",
        (
            "op",
            "scheme",
            "m",
            "k",
            "n",
            "fused ms",
            "by hand ms",
            "ratio [min-max]",
            "vs same kernel",
            "equal",
        ),
        table,
    )
    for op in ("all_gather_base_mm", "mm_reduce_scatter_base"):
        for scheme in SCHEMES:
            mine = [t for t in table if t[0] == op and t[1] == scheme]
            worst = max(mine, key=lambda t: t[7].median)
            targets.append(
                Target(
                    f"sp {op} {scheme}: fused / hand-written (worst shape m={worst[2]} n={worst[4]})",
                    worst[7],
                    "<=",
                    GOAL,
                )
            )
    model = _model_tables()
    print_targets(targets)
    groups = [f"{t[0][:6]} {t[1]} m{t[2]}" for t in table]
    plot_bars(
        "sp",
        "sp fused / hand-written time (portable, TP=2 gloo; dashed: 1.05 goal)",
        groups,
        {"ratio": [t[7].median for t in table]},
        "time ratio",
        errors={"ratio": [(t[7].lo, t[7].hi) for t in table]},
        hline=GOAL,
    )
    save_results("sp", {"quick": quick, "rows": rows, "model": model}, targets)
    return targets
