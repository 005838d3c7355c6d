"""The overlap MODEL (bench/overlap.py) extended to the sequence-parallel MC2 kernels -- a MODEL,
not a measurement: AllGatherMatmul (npu_all_gather_base_mm, column layers) and
MatmulReduceScatter (npu_mm_reduce_scatter_base, row layers) on Atlas A2 (910B, full mesh).

Kernel facts, from the CANN tiling sources (hicann/ops-transformer; paths below are under it):

- Both split M into at most 16 tiles (``MAX_TILE_CNT``) of at most two lengths, aligned to the
  128-row base block (mc2/common/inc/tiling/hccl_formulaic_tiling.h, FormPartition); 8 tiles at
  most when the all-gather's bandwidth grows under overlap (see ``_growth``) and M is not in
  (2048, 4096] (mc2/all_gather_matmul/op_host/op_tiling/all_gather_formulaic_tiling.cpp).
- AllGatherMatmul (all_gather_formulaic_tiling.cpp): the tile is rows per rank; tile i is
  gathered from the ws - 1 peers (``rankTileNum = ws - 1``), then its ``r_i * (ws - 1)`` rows
  are multiplied. The local rows are multiplied FIRST, while the first tile is being gathered
  (``hasLocalAtFront_``, ``frontMMTime_``); when the whole gather is shorter than that local
  matmul the kernel does not split at all (``noCutFlag_``).
- MatmulReduceScatter (mc2/matmul_reduce_scatter/op_host/reduce_scatter_formulaic_tiling.cpp,
  op_tiling/matmul_reduce_scatter_tiling.cpp): the tile is rows per destination rank (M / ws
  must be whole); each tile multiplies ``r_i * ws`` rows (one block per destination), then
  reduce-scatters them while the next tile is computed.
- Communication cost (mc2/common/src/hccl_performance.cpp, full mesh): the all-reduce fitting
  curve of KERNELS.md applied to the TOTAL bytes ``rows * L * ws * bytes`` (L = k for the
  gather, n for the reduce-scatter), divided by ``commTimeFactor = 2.0 / (8 / ws)`` (fitted on 8
  dies), i.e. ``curve(total) * 4 / ws``; under overlap the tiling grows it by 1.15
  (``commGrowRatio``) and, for ws > 2, by 3x / 1.5x (gather) or 1.5x / 1.2x (reduce-scatter)
  when cube utilisation < 0.85 or k >= 8192 and n > 5120.
- Matmul cost (mc2/common/src/matmul_performance.cpp): ``max(128, r) * blocks * N * K /
  (4096 * 1800 * cores * util)`` per tile (``MatmulTime``: the 128-row floor is per block).
- Minimum tile (``GetLinearThresholdLen``): 64 KB of communicated data per tile
  (``HCCL_MIN_TILE_LEN / (L * ws * bytes)``), and a matmul floor of ``10 GiB / (N K blocks)``
  rows (blocks > 2) or ``max(4 GiB / 20 * cores / (N K), 6 MiB / 20 * cores / (N K / 1024 + N))
  / blocks`` and at least 384 rows otherwise; a shape shorter than two minimum tiles is not
  split (``SetShortTileLen``).

The model: unfused = matmul of all rows + the standalone collective (the cost models scaled to
the published case 1 like bench/overlap.py; the 1.15 of the all-reduce fit is kept as there).
Fused = a two-stage pipeline (``pipeline_us``) over the best chunking the kernel's rules allow
(``overlap.candidate_chunkings`` filtered by the minimum tile and tile count), every chunk after
the first paying the calibrated fixed cost ``f`` on both stages, contention ``kappa`` as in
bench/overlap.py (fitted 0 on the all-reduce cases). The kernel's own balancing heuristics
(FitTileLengthDiscrete) are replaced by that search, so the fused time is the model's best
case. ``grown=True`` also multiplies the overlapped communication by the tiling's 3x / 1.5x /
1.2x growth factors: the tiling uses them to pick tiles and no published case calibrates them,
so they give the pessimistic end of the range, not the expected time.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from bench.overlap import (
    DEFAULT_PARAMS,
    MAX_ROUNDS,
    ROW_ALIGN,
    ModelParams,
    Prediction,
    _cost_scales,
    allreduce_us,
    candidate_chunkings,
    matmul_us,
    pipeline_us,
)

__all__ = [
    "SP_LLM_SHAPES",
    "SpPrediction",
    "comm_us",
    "min_tile_rows",
    "pipeline_us",
    "predict_sp",
    "sp_table",
]

CORES = 24  # AI cube cores of an Atlas 800T A2 (910B2), as overlap.matmul_us assumes
_GIB, _MIB = 2**30, 2**20


@dataclasses.dataclass(frozen=True)
class SpPrediction(Prediction):
    """One shape: ``overlap.Prediction`` of one SP kernel; ``chunks`` are rows per rank for the
    gather, rows per destination for the reduce-scatter."""

    kind: str  # "ag" | "rs"


def comm_us(kind: str, rows: int, length: int, ws: int, bytes_per_el: int = 2) -> float:
    """Standalone all-gather ("ag": ``rows`` per rank of ``length`` = k) or reduce-scatter
    ("rs": ``rows`` per destination of ``length`` = n) time on a full mesh of ``ws`` ranks:
    the fitted curve on the total bytes, times 4 / ws (hccl_performance.cpp), scaled to the
    published case 1 as bench/overlap.py scales its all-reduce."""
    del kind  # same formula for both: only L and the byte width differ
    _, s_comm = _cost_scales()
    return allreduce_us(rows * ws, length, bytes_per_el) * 4.0 / ws * s_comm


def _mm_us(rows: int, blocks: int, n: int, k: int, bytes_per_el: int) -> float:
    """Matmul of ``blocks`` blocks of ``rows`` rows (128-row floor per block), scaled to case 1."""
    s_mm, _ = _cost_scales()
    return matmul_us(max(rows, ROW_ALIGN) * blocks, n, k, bytes_per_el, CORES) * s_mm


def _matmul_threshold(n: int, k: int, blocks: int) -> int:
    """MatmulPerformanceModel::GetLinearThresholdLen (non-batched, 910B)."""
    tn, tk = max(ROW_ALIGN, n), max(ROW_ALIGN, k)
    if blocks > 2:
        return max(10 * _GIB // (tn * tk * blocks), ROW_ALIGN)
    thr = max(4 * _GIB // 20 * CORES // (tn * tk), 6 * _MIB // 20 * CORES // (tn * tk // 1024 + tn))
    if blocks > 1:
        thr //= blocks
    return max(3 * ROW_ALIGN, thr)


def min_tile_rows(kind: str, n: int, k: int, ws: int, in_bytes: int = 2, out_bytes: int = 2) -> int:
    """The tiling's minimum tile (rows per rank / per destination) before its balancing tweaks."""
    length, nbytes = (k, in_bytes) if kind == "ag" else (n, out_bytes)
    comm_min = 64 * 1024 // (length * ws * nbytes)
    # AllGatherPlusMM on 910B passes rankDim, MMPlusReduceScatter rankTileNum (= ws)
    return max(ROW_ALIGN, comm_min, _matmul_threshold(n, k, ws))


def _growth(kind: str, m: int, n: int, k: int, ws: int, bytes_per_el: int) -> tuple[float, int]:
    """(communication growth under overlap beyond the fit's 1.15, max tile count)."""
    blocks = ws - 1 if kind == "ag" else ws
    if ws <= 2 or blocks <= 2:
        return 1.0, MAX_ROUNDS
    rows = m * blocks
    footprint = (rows * k + k * n + rows * n) * bytes_per_el / _MIB
    low_util = footprint > 128  # overlap.matmul_us's L2 rule: util < 0.85 beyond 128 MB
    big_shape = k >= 8192 and n > 5120
    if not (low_util or big_shape):
        return 1.0, MAX_ROUNDS
    if kind == "rs":
        return (1.5 if low_util else 1.2), MAX_ROUNDS
    median_m = 2048 < m <= 4096
    return (3.0 if low_util else 1.5), (MAX_ROUNDS if median_m else 8)


def predict_sp(
    kind: str,
    m: int,
    n: int,
    k: int,
    ws: int,
    bytes_per_el: int = 2,
    params: ModelParams | None = None,
    grown: bool = False,
) -> SpPrediction:
    """Fused vs unfused time of one call (``grown``: apply the tiling's growth factors).

    kind "ag": ``m`` rows per rank of (m, k) gathered, times x2 (k, n) (n = this rank's
    columns). kind "rs": (m, k) @ (k, n) on every rank (k = this rank's k-shard), m divisible
    by ws, reduce-scattered to (m / ws, n)."""
    params = params or DEFAULT_PARAMS
    f = params.fixed_us
    if kind == "ag":
        tiles_total, blocks, length = m, ws - 1, k
        mm_all = _mm_us(m * ws, 1, n, k, bytes_per_el)
        front = _mm_us(m, 1, n, k, bytes_per_el)
    elif kind == "rs":
        if m % ws:
            raise ValueError(f"m: {m} must be divisible by ws = {ws} (R8)")
        tiles_total, blocks, length = m // ws, ws, n
        mm_all = _mm_us(m, 1, n, k, bytes_per_el)
        front = 0.0
    else:
        raise ValueError(f"kind: 'ag' or 'rs', got {kind!r}")
    comm_all = comm_us(kind, tiles_total, length, ws, bytes_per_el)
    growth, max_tiles = _growth(kind, tiles_total, n, k, ws, bytes_per_el)
    growth = growth if grown else 1.0
    min_tile = min_tile_rows(kind, n, k, ws, bytes_per_el, bytes_per_el)
    cands: list[tuple[int, ...]] = [(tiles_total,)]
    if tiles_total >= 2 * min_tile:
        for short_first in (True, False):
            for c in candidate_chunkings(tiles_total, short_first):
                if len(c) > 1 and len(c) <= max_tiles and min(c) >= min(min_tile, max(c)):
                    cands.append(c)

    def fused(chunks: tuple[int, ...]) -> float:
        fix = [0.0] + [f] * (len(chunks) - 1)
        if kind == "rs" and len(chunks) == 1:  # nothing overlaps the reduce-scatter
            return _mm_us(chunks[0], blocks, n, k, bytes_per_el) + comm_all
        comm = [
            comm_us(kind, r, length, ws, bytes_per_el) * growth + x for r, x in zip(chunks, fix)
        ]
        mm = [_mm_us(r, blocks, n, k, bytes_per_el) + x for r, x in zip(chunks, fix)]
        if kind == "ag":
            return pipeline_us(comm, mm, params.kappa, second_front=front)
        return pipeline_us(mm, comm, params.kappa)

    best = min(cands, key=fused)
    return SpPrediction(mm_all, comm_all, mm_all + comm_all, fused(best), best, kind)


# Column layers (all-gather + matmul) and row layers (matmul + reduce-scatter) of Llama-2-7B
# (hidden 4096, MLP 11008, 32 heads) and Llama-2/3-70B (hidden 8192, MLP 28672, 64 q / 8 kv
# heads of 128): (name, kind, full k, full n).
SP_LLM_SHAPES = (
    ("7B qkv_proj", "ag", 4096, 3 * 4096),
    ("7B gate_up_proj", "ag", 4096, 2 * 11008),
    ("7B o_proj", "rs", 4096, 4096),
    ("7B down_proj", "rs", 11008, 4096),
    ("70B qkv_proj", "ag", 8192, 8192 + 2 * 1024),
    ("70B gate_up_proj", "ag", 8192, 2 * 28672),
    ("70B o_proj", "rs", 8192, 8192),
    ("70B down_proj", "rs", 28672, 8192),
)


def sp_table(
    tps: Sequence[int] = (2, 4, 8),
    tokens: Sequence[int] = (256, 512, 1024, 2048, 4096, 8192, 16384),
    params: ModelParams | None = None,
) -> list[dict]:
    """Per layer and TP: modelled speedup (%) of the fused kernel at each token count M (all
    tokens of the sequence-parallel group), and the smallest M where it is >= 5% faster."""
    rows = []
    for (name, kind, k, n), tp in itertools.product(SP_LLM_SHAPES, tps):
        preds, grown = {}, {}
        for big_m in tokens:
            if big_m % tp:
                continue
            # column layer: x (M / tp, k) gathered, weight (k, n / tp);
            # row layer: x (M, k / tp), weight (k / tp, n)
            args = (big_m // tp, n // tp, k) if kind == "ag" else (big_m, n, k // tp)
            preds[big_m] = predict_sp(kind, *args, tp, params=params)
            grown[big_m] = predict_sp(kind, *args, tp, params=params, grown=True)
        pays = next((mm for mm, p in preds.items() if p.speedup_pct >= 5.0), None)
        rows.append(
            {
                "layer": name,
                "kind": kind,
                "tp": tp,
                "speedup_pct": {mm: round(p.speedup_pct, 1) for mm, p in preds.items()},
                "speedup_pct_grown": {mm: round(p.speedup_pct, 1) for mm, p in grown.items()},
                "chunks": {mm: list(p.chunks) for mm, p in preds.items()},
                "unfused_us": {mm: round(p.unfused_us, 1) for mm, p in preds.items()},
                "comm_share_pct": {
                    mm: round(100 * p.comm_us / p.unfused_us, 1) for mm, p in preds.items()
                },
                "pays_from_m": pays,
            }
        )
    return rows
