"""Facts of the fused op ``mm_all_reduce_base`` that every other module of the package reads:
its argument list, the dtype tables, storage-format ids, supported world sizes, and the Atlas
A2 kernel's M-tiling rule (when it splits M into pipelined chunks at all).

A leaf module: it imports only torch. The rules themselves are CONTRACT.md C1-C14 / Q1-Q9
(checked in ``_validate``); the tiling facts are from the CANN sources cited below.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = [
    "FORMAT_ND",
    "FORMAT_NZ",
    "FP_DTYPES",
    "FP_DTYPES_PORTABLE",
    "FUSED_KWARGS",
    "INT_MAX",
    "MIN_TILE_ROWS",
    "NO_SPLIT_BELOW_ROWS",
    "QUANT_DIM_MAX",
    "A2_CUBE_CORES",
    "W8A8_DEQUANT_SCALE_DTYPES",
    "SP_WORLD_SIZES_ASCEND",
    "WORLD_SIZES",
    "MmAllReduceArgs",
    "allreduce_us",
    "kernel_min_tile_rows",
    "kernel_splits_m",
    "kernel_tile_rows",
    "matmul_us",
    "output_dtype",
    "w8a8_output_dtype",
]

FORMAT_ND = 2
FORMAT_NZ = 29  # ACL_FORMAT_FRACTAL_NZ

WORLD_SIZES = (1, 2, 4, 8)
# all_gather_base_mm / mm_reduce_scatter_base on Atlas A2 (HCCS full mesh): docs/MC2_FAMILY.md
SP_WORLD_SIZES_ASCEND = (2, 4, 8)
INT_MAX = 2**31 - 1
QUANT_DIM_MAX = 65535

FP_DTYPES = (torch.float16, torch.bfloat16)
FP_DTYPES_PORTABLE = (torch.float16, torch.bfloat16, torch.float32)
W8A8_DEQUANT_SCALE_DTYPES = (torch.int64, torch.uint64, torch.bfloat16, torch.float32)


class MmAllReduceArgs(NamedTuple):
    """The arguments of ``mm_all_reduce_base`` in the vendor's order (hcom and everything after
    it as in ``torch_npu.npu_mm_all_reduce_base``), with the vendor's defaults."""

    x1: torch.Tensor
    x2: torch.Tensor
    hcom: str
    reduce_op: str = "sum"
    bias: torch.Tensor | None = None
    antiquant_scale: torch.Tensor | None = None
    antiquant_offset: torch.Tensor | None = None
    x3: torch.Tensor | None = None
    dequant_scale: torch.Tensor | None = None
    pertoken_scale: torch.Tensor | None = None
    comm_quant_scale_1: torch.Tensor | None = None
    comm_quant_scale_2: torch.Tensor | None = None
    comm_turn: int = 0
    antiquant_group_size: int = 0

    def keywords(self) -> dict[str, Any]:
        """The vendor's keyword-only arguments (everything after hcom) as a dict."""
        return {name: getattr(self, name) for name in FUSED_KWARGS}


FUSED_KWARGS = MmAllReduceArgs._fields[3:]


def w8a8_output_dtype(dequant_scale: torch.Tensor) -> torch.dtype:
    """W8A8 output dtype by the dtype table: bf16 dequant scale -> bf16, otherwise fp16."""
    return torch.bfloat16 if dequant_scale.dtype == torch.bfloat16 else torch.float16


def output_dtype(x1: torch.Tensor, dequant_scale: torch.Tensor | None) -> torch.dtype:
    """Output dtype of the fused op: x1's in FP / W8A16, the W8A8 table for int8 x1."""
    if x1.dtype == torch.int8:
        assert dequant_scale is not None
        return w8a8_output_dtype(dequant_scale)
    return x1.dtype


# -- the Atlas A2 kernel's M tiling (hicann/ops-transformer, mc2/) ----------------------------
# MMPlusAllReduce (mc2/matmul_all_reduce/op_host/op_tiling/all_reduce_formulaic_tiling.{h,cpp})
# serves FP, W8A16 and W8A8 without comm quant (matmul_all_reduce_tiling.cpp, DoSplitMTiling).
# Its minimum tile length starts at BASE_BLOCK_M = 128 and is raised (SetMinLenByMax) to the
# HCCL linear threshold HCCL_MIN_TILE_LEN / (n * out_bytes) (mc2/common/src/hccl_performance.cpp,
# 64 KiB) and to the matmul one, max(MIN_M_SIZE_FACTOR * baseM, MIN_DATA_PAR1 / (N * K),
# MIN_DATA_PAR2 / (N * K / 1024 + N)) with N, K >= baseM and both data constants scaled by
# coreNum / 20 (mc2/common/src/matmul_performance.cpp GetLinearThresholdLen;
# mc2/common/inc/tiling/matmul_performance.h MIN_M_SIZE_FACTOR = 3,
# formulaic_tiling_datatype.h MIN_DATA_PAR1 = 4 GiB, MIN_DATA_PAR2 = 6 MiB). EstimateKernelTime
# halves it when compute and communication are within 2x, m < 2 * min and n * k >= 32 Mi
# (LARGE_NK_BAR); SelectTilingMethod does not cut M when m < 2 * min.
_BASE_M = 128
_MIN_M_SIZE_FACTOR = 3
MIN_TILE_ROWS = _MIN_M_SIZE_FACTOR * _BASE_M  # 384
NO_SPLIT_BELOW_ROWS = 2 * MIN_TILE_ROWS  # 768
_HCCL_MIN_TILE_BYTES = 64 * 1024
_MIN_DATA_PAR1 = 4 * 2**30
_MIN_DATA_PAR2 = 6 * 2**20
_MARK_CORE_NUM = 20
_LARGE_NK = 32 * 2**20
A2_CUBE_CORES = 24  # Atlas 800T A2 (910B2)


def kernel_min_tile_rows(n: int, k: int, out_bytes: int = 2, cores: int = A2_CUBE_CORES) -> int:
    """The kernel's minimum M chunk length before the halving rule, for a per-rank (k, n)
    weight and an output element of ``out_bytes``."""
    nn, kk = max(_BASE_M, n), max(_BASE_M, k)
    par1 = _MIN_DATA_PAR1 // _MARK_CORE_NUM * cores
    par2 = _MIN_DATA_PAR2 // _MARK_CORE_NUM * cores
    mm = max(MIN_TILE_ROWS, par1 // (nn * kk), par2 // (nn * kk // 1024 + nn))
    comm = _HCCL_MIN_TILE_BYTES // (n * out_bytes)
    return max(_BASE_M, comm, mm)


def kernel_tile_rows(m: int, n: int, k: int, out_bytes: int = 2, cores: int = A2_CUBE_CORES) -> int:
    """The kernel's minimum M chunk length for this call, after the halving rule (compute and
    communication estimates within 2x, m below twice the minimum, n * k >= 32 Mi)."""
    lo = kernel_min_tile_rows(n, k, out_bytes, cores)
    if m < 2 * lo and n * k >= _LARGE_NK:
        mm, comm = matmul_us(m, n, k, out_bytes, cores), allreduce_us(m, n, out_bytes)
        if max(mm, comm) / min(mm, comm) < 2.0:
            lo = lo // 2
    return lo


def kernel_splits_m(m: int, n: int, k: int, out_bytes: int = 2, cores: int = A2_CUBE_CORES) -> bool:
    """Whether the Atlas A2 fused kernel cuts m rows into more than one pipelined chunk (it
    overlaps matmul and all-reduce only then; otherwise it runs them one after the other).

    m: rows of x1 (tokens); n, k: the per-rank weight (k, n); out_bytes: output element size.
    """
    return m >= 2 * kernel_tile_rows(m, n, k, out_bytes, cores)


# Cost estimates of the vendor tiling (KERNELS.md "Inside npu_mm_all_reduce_base"): the HCCL
# fit of mc2/common/src/hccl_performance.cpp with its 1.15 margin and the matmul model of
# mc2/common/src/matmul_performance.cpp (utilisation by L2 footprint, x0.7 for k % 128 != 0).


def allreduce_us(m: int, n: int, bytes_per_el: int = 2) -> float:
    """Vendor tiling estimate (us) of an all-reduce of an (m, n) output on Atlas A2."""
    x = m * n * bytes_per_el / 2**20
    if x * 2**20 < 64 * 1024:
        base = 18.0
    elif x < 8:
        base = -0.9698 * x * x + 27.06 * x + 14.77
    else:
        base = 13.585 * x + 61.5
    return base * 1.15


def matmul_us(m: int, n: int, k: int, bytes_per_el: int = 2, cores: int = A2_CUBE_CORES) -> float:
    """Vendor tiling estimate (us) of an (m, k) x (k, n) matmul on ``cores`` cube cores."""
    footprint = (m * k + k * n + m * n) * bytes_per_el / 2**20
    util = 0.85 if footprint <= 128 else 0.75 if footprint <= 192 else 0.65
    if k % 128:
        util *= 0.7
    return max(m, 128) * n * k / (4096 * 1800 * cores * util)
