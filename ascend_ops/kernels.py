"""The helper kernels the layers call, dispatched by backend: tensors the Ascend backend owns
go to torch_npu (``_npu``), everything else to the portable golden implementations
(``_portable``, whose docstring states the rounding of each scenario).

Rounding to int8 (quantize, dynamic_quant) is round-half-to-even (the vendor's CAST_RINT on
Atlas A2) followed by saturation to [-128, 127].
"""

from __future__ import annotations

import sys

import torch

from ascend_ops import _portable, backend
from ascend_ops._portable import (
    BF16_GEMM_MAX_M,
    W8A8_INT_MM_MAX_M,
    W8A16_INT8PACK_MAX_M,
    antiquant_weight,
    prepare_w8a16_weight,
)
from ascend_ops.contract import w8a8_output_dtype

__all__ = [
    "BF16_GEMM_MAX_M",
    "W8A16_INT8PACK_MAX_M",
    "W8A8_INT_MM_MAX_M",
    "antiquant_weight",
    "dynamic_quant",
    "fp_matmul",
    "mm_local",
    "prepare_w8a16_weight",
    "quant_matmul",
    "quantize",
    "w8a8_output_dtype",
    "weight_quant_matmul",
]


def _on_npu(t: torch.Tensor) -> bool:
    return backend.select(t) is backend.Backend.ASCEND


def fp_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    x3: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP per-rank value ``x @ w + bias + x3``. x: (m, k) or (b, s, k) fp16/bf16 (fp32: portable
    only); w: (k, n) same dtype; bias: (n,); x3: like output. Returns x's dtype."""
    if _on_npu(x):
        from ascend_ops import _npu

        return _npu.fp_matmul(x, w, bias, x3)
    return _portable.fp_matmul(x, w, bias, x3)


def weight_quant_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    x3: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A16 ``x @ ((weight + offset) * scale) + bias [+ x3]`` (npu_weight_quant_batchmatmul).

    x: (m, k) or (b, s, k) fp16/bf16 (fp32 on the portable backend); weight: (k, n) int8;
    antiquant_scale / offset: [1], [n], [1, n] or [ceil(k/g), n] in x's dtype; bias: (n,) x's
    dtype or fp32. Output: x's dtype.
    """
    if _on_npu(x):
        from ascend_ops import _npu

        return _npu.weight_quant_matmul(
            x, weight, antiquant_scale, antiquant_offset, bias, antiquant_group_size, x3
        )
    return _portable.weight_quant_matmul(
        x, weight, antiquant_scale, antiquant_offset, bias, antiquant_group_size, x3
    )


def quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    scale: torch.Tensor,
    *,
    offset: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
    x3: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 ``(x1 @ x2 + bias_int32) * scale [* pertoken_scale] [+ x3]`` (npu_quant_matmul).

    x1: (m, k) or (b, s, k) int8; x2: (k, n) int8; scale: [1] / [n] / [1, n] as int64/uint64
    (packed by trans_quant_param), float32 or bf16; pertoken_scale: float32 [m]; bias: int32.
    output_dtype: fp16 / bf16 (default by the W8A8 dtype table) or int8 (re-quantization with
    ``offset``).
    """
    kw = dict(
        offset=offset, pertoken_scale=pertoken_scale, bias=bias, output_dtype=output_dtype, x3=x3
    )
    if _on_npu(x1):
        from ascend_ops import _npu

        return _npu.quant_matmul(x1, x2, scale, **kw)
    return _portable.quant_matmul(x1, x2, scale, **kw)


def quantize(
    input: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None = None,
    dtype: torch.dtype = torch.int8,
    axis: int = 1,
    div_mode: bool = True,
) -> torch.Tensor:
    """Static quantization (npu_quantize): ``rint(x / scales + zero_points)`` (div_mode) or
    ``rint(x * scales + zero_points)``, saturated to int8.

    input: any shape, float; scales / zero_points: [1] (per-tensor) or [input.shape[axis]]
    (per-channel). Returns int8, input's shape.
    """
    if dtype not in (torch.int8, torch.qint8):
        raise ValueError(f"dtype: only int8 output is supported, got {dtype}")
    if _on_npu(input):
        from ascend_ops import _npu

        return _npu.quantize(input, scales, zero_points, axis, div_mode)
    return _portable.quantize(input, scales, zero_points, axis, div_mode)


def dynamic_quant(
    input: torch.Tensor, *, smooth_scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization (npu_dynamic_quant). input: (..., k) fp16/bf16 ->
    (int8 of input's shape, float32 scale of shape input.shape[:-1])."""
    if _on_npu(input):
        from ascend_ops import _npu

        return _npu.dynamic_quant(input, smooth_scales)
    return _portable.dynamic_quant(input, smooth_scales)


def mm_local(
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    antiquant_scale: torch.Tensor | None = None,
    antiquant_offset: torch.Tensor | None = None,
    x3: torch.Tensor | None = None,
    dequant_scale: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
) -> torch.Tensor:
    """The fused op's per-rank value (everything but the all-reduce), by scenario, on x1's
    backend. Same arguments and dtype rules as mm_all_reduce_base; the caller validates them.
    """
    return _portable.mm_local(
        x1,
        x2,
        bias=bias,
        antiquant_scale=antiquant_scale,
        antiquant_offset=antiquant_offset,
        x3=x3,
        dequant_scale=dequant_scale,
        pertoken_scale=pertoken_scale,
        antiquant_group_size=antiquant_group_size,
        ops=sys.modules[__name__],
    )
