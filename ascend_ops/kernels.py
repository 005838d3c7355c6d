"""The per-rank math of every scenario, written once and shared by the fused op's portable
backend and the unfused (decode) path, plus the vendor helper kernels built on it.

Precision, per scenario (the portable backend is the golden reference for the fused kernel):

- FP (fp16 / bf16 / fp32): products accumulated in float32 (oneDNN's bf16 GEMM accumulates in
  fp32; fp16 is computed as an fp32 GEMM because CPU fp16 GEMM is slow), ``bias`` and ``x3``
  added in float32, ONE rounding to the output dtype per rank. bf16 at small m
  (``BF16_GEMM_MAX_M``) with at most one of ``bias`` / ``x3`` (in bf16) stays a bf16
  ``matmul`` / ``addmm``, whose beta-term is added to the fp32 accumulator before the single
  rounding; otherwise the operands are upcast (faster on AVX2 CPUs at larger m, and the only
  single-rounding way to add two terms: CPU torch has no bf16 GEMM with fp32 output).
- W8A16: the weight is dequantized in the activation dtype exactly as the vendor golden does
  (``w.to(dt) + offset`` rounded to dt, then ``* scale`` rounded to dt), then an FP matmul with
  fp32 accumulation; bias / x3 in fp32; one final rounding. Exception, for speed at small m
  (decode): symmetric per-tensor / per-channel weights in the prepared layout
  (``prepare_w8a16_weight``), bf16 x and m <= ``W8A16_INT8PACK_MAX_M`` use
  ``torch._weight_int8pack_mm``, which skips the rounding of ``w * scale`` to dt (see
  ``weight_quant_matmul`` for the bound on the difference).
- W8A8: int8 x int8 products accumulated exactly in int32 (``torch._int_mm``; on CPU above
  ``W8A8_INT_MM_MAX_M`` rows exact float32 GEMMs on k-chunks of 1024), int32 bias added
  to the accumulator, then ``acc * dequant_scale [* pertoken_scale]`` in float32, ``+ x3`` in
  float32, one rounding to the output dtype. An int64/uint64 dequant scale is unpacked
  bit-exactly (the float32 scale with its low 13 mantissa bits cleared).

Rounding to int8 (quantize, dynamic_quant) is round-half-to-even (the vendor's CAST_RINT on
Atlas A2) followed by saturation to [-128, 127].
"""

from __future__ import annotations

import torch

from ascend_ops import backend
from ascend_ops.quant_param import truncate_scale, unpack_quant_param

__all__ = [
    "W8A16_INT8PACK_MAX_M",
    "W8A8_INT_MM_MAX_M",
    "dequantize_weight",
    "dynamic_quant",
    "fp_matmul",
    "mm_local",
    "prepare_w8a16_weight",
    "quant_matmul",
    "quantize",
    "w8a8_output_dtype",
    "weight_quant_matmul",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    # no reshape call for a 2-D x: every avoided tensor op is ~1 us of per-call overhead
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _unflatten(y: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """(m, n) -> lead + (n,) (no op for a 2-D input)."""
    return y if len(lead) == 1 else y.reshape(*lead, y.shape[-1])


def _finish(
    acc: torch.Tensor, out_dtype: torch.dtype, x3: torch.Tensor | None, lead: tuple[int, ...]
) -> torch.Tensor:
    """acc: (m, n) float32 -> (+ x3) -> one rounding -> lead + (n,)."""
    if x3 is not None:
        acc = acc + x3.reshape(acc.shape).float()
    return _unflatten(acc.to(out_dtype), lead)


# Largest m for which fp_matmul keeps a bf16 GEMM; above it the operands are upcast and an fp32
# GEMM is used (same single rounding, different speed). On CPUs without native bf16 (AVX2)
# oneDNN's bf16 GEMM is several times slower than sgemm once the upcast of w is amortized.
# bench/kernels_switch.py, k = n = 4096, median ms, bf16 GEMM vs upcast + fp32 GEMM:
# m=16: 24.8 vs 40.5, m=32: 49.1 vs 46.5, m=64: 99.1 vs 47.8, m=256: 395.6 vs 114.8.
BF16_GEMM_MAX_M = 32


def fp_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    x3: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP per-rank value ``x @ w + bias + x3``.

    x: (m, k) or (b, s, k), fp16/bf16/fp32; w: (k, n) same dtype; bias: (n,); x3: like output.
    Returns (m, n) / (b, s, n) in x's dtype.
    """
    lead = tuple(x.shape[:-1])
    x2d = _as_2d(x)
    if x.dtype == torch.bfloat16 and x2d.shape[0] <= BF16_GEMM_MAX_M:
        # One bf16 GEMM (fp32 accumulation, one rounding). addmm adds its bf16 ``input`` term
        # to the fp32 accumulator before that rounding (checked in tests/test_kernels.py), so a
        # single bf16 bias or x3 needs no upcast; bias + x3 together would need two terms.
        if x3 is None and (bias is None or bias.dtype == torch.bfloat16):
            y = torch.matmul(x2d, w) if bias is None else torch.addmm(bias, x2d, w)
            return _unflatten(y, lead)
        if bias is None and x3 is not None and x3.dtype == torch.bfloat16:
            return _unflatten(torch.addmm(_as_2d(x3), x2d, w), lead)
    if x.dtype == torch.float32:
        acc = torch.matmul(x2d, w)
    else:
        acc = torch.matmul(x2d.float(), w.float())
    if bias is not None:
        acc = acc + bias.float()
    return _finish(acc, x.dtype, x3, lead)


def _expand_antiquant(p: torch.Tensor, k: int, n: int, group_size: int) -> torch.Tensor:
    """antiquant scale/offset [1] | [1,1] | [n] | [1,n] | [ceil(k/g), n] -> broadcastable to (k, n)."""
    if p.numel() == 1:
        return p.reshape(1, 1)
    if group_size > 0:
        return p.repeat_interleave(group_size, dim=0)[:k]
    return p.reshape(1, n)


def dequantize_weight(
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(weight + offset) * scale`` in ``dtype`` (default: the scale's), rounded as the vendor
    golden does. weight: (k, n) int8 -> (k, n) dtype."""
    dt = dtype or antiquant_scale.dtype
    k, n = weight.shape
    w = weight.to(dt)
    if antiquant_offset is not None:
        w = w + _expand_antiquant(antiquant_offset.to(dt), k, n, antiquant_group_size)
    return w * _expand_antiquant(antiquant_scale.to(dt), k, n, antiquant_group_size)


# Largest m (rows of x) for which weight_quant_matmul uses torch._weight_int8pack_mm instead of
# dequantize + GEMM (the GEMM being fp_matmul's, i.e. upcast fp32 above BF16_GEMM_MAX_M).
# bench/kernels_switch.py (median of 5, bf16, 2 threads, AVX2-only AMD EPYC, shared machine),
# k = n = 4096, int8pack vs dequant + fp32 GEMM, ms: m=1: 1.2 vs 76 (vs 40 with a bf16 GEMM),
# m=64: 27 vs 76, m=128: 69 vs 113, m=256: 141 vs 157, m=384: 208 vs 182. So the int8 kernel
# wins up to ~300 rows at 4096 x 4096. Smaller k moves the switch down (k=1024, n=4096: ties
# between m=64 and m=256, noisy), k=11008 n=4096 favours int8pack at least to m=64 (184 vs
# 946). Full tables in bench/results/kernels_switch.txt; re-measure on other hosts (with
# native bf16 GEMM, e.g. AMX, the dequant + bf16 GEMM path gets much faster).
W8A16_INT8PACK_MAX_M = 256


def prepare_w8a16_weight(weight: torch.Tensor) -> torch.Tensor:
    """Store a (k, n) int8 weight as a transposed view of an (n, k) contiguous tensor.

    Call once at load time (process_weights_after_loading). The result is the same logical
    (k, n) matrix, valid everywhere a (k, n) weight is (CONTRACT C2 accepts such a transposed
    view), and ``weight.t()`` is the (n, k) contiguous operand that the portable W8A16 fast path
    (torch._weight_int8pack_mm) reads with no per-call copy. Returns ``weight`` itself when it
    already has that layout. On Ascend keep ND (k, n) and cast to NZ instead.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: must be 2-D (k, n), got shape {tuple(weight.shape)}")
    if weight.t().is_contiguous():
        return weight
    return weight.t().contiguous().t()


def _int8pack_ok(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None,
    antiquant_group_size: int,
) -> bool:
    """Whether the torch._weight_int8pack_mm fast path applies (see weight_quant_matmul)."""
    return (
        antiquant_offset is None
        and antiquant_group_size == 0
        and 1 <= x2d.shape[0] <= W8A16_INT8PACK_MAX_M
        and x2d.device.type == "cpu"
        and x2d.dtype == torch.bfloat16
        and weight.dim() == 2
        # the CPU kernel reads k in blocks of 8: other k give garbage or crash (measured: k in
        # {1, 3, 12, 33} fail, multiples of 8 are exact)
        and weight.shape[0] % 8 == 0
        and weight.shape[0] > 1
        and weight.stride(0) == 1  # the (n, k) storage of prepare_w8a16_weight, no view made
        and weight.stride(1) == weight.shape[0]
        and antiquant_scale.numel() in (1, weight.shape[1])
    )


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

    Portable kernels. Golden: dequantize_weight (``w * scale`` rounded to x's dtype, as the
    vendor golden) then fp_matmul. Fast path, when there is no offset, the scale is per-tensor
    or per-channel, the weight comes from prepare_w8a16_weight (``weight.t()`` contiguous) and
    m <= W8A16_INT8PACK_MAX_M and x is bf16 (the kernel's fp16 / fp32 variants are 10-25x
    slower than its bf16 one on this AVX2 CPU, so those dtypes stay golden):
    ``torch._weight_int8pack_mm(x, weight.t(), scale)``, which computes
    ``bf16(scale_n * sum_k x[m, k] * w[k, n])`` with fp32 accumulation and one rounding (scale
    in bf16, as the golden uses it). It differs from the golden in not rounding each
    ``w * scale`` to bf16 (relative error <= 2^-9 per product; none when the scale is a power
    of two), so ``|fast - golden| <= 2^-9 * sum_k |x[m, k] * w[k, n] * scale_n|`` plus one
    output ulp and fp32 summation-order noise; the fast path is the closer of the two to exact
    arithmetic. A bias / x3 is then added in fp32 to the bf16 result, a second rounding (at
    most one more output ulp) that the golden path does not have.
    """
    if backend.select(x) is backend.Backend.ASCEND:
        from ascend_ops import _npu

        return _npu.weight_quant_matmul(
            x, weight, antiquant_scale, antiquant_offset, bias, antiquant_group_size, x3
        )
    x2d = _as_2d(x)
    if _int8pack_ok(x2d, weight, antiquant_scale, antiquant_offset, antiquant_group_size):
        n = weight.shape[1]
        scale = antiquant_scale
        if scale.dtype != x.dtype or scale.dim() != 1 or scale.shape[0] != n:
            # per-tensor / [1, n] / other dtype; the layers pass a prepared [n] scale as is
            scale = scale.to(x.dtype).reshape(-1).expand(n).contiguous()
        y = torch._weight_int8pack_mm(x2d.contiguous(), weight.t(), scale)
        if bias is None and x3 is None:
            return _unflatten(y, tuple(x.shape[:-1]))
        acc = y.float() if bias is None else y.float() + bias.float()
        return _finish(acc, x.dtype, x3, tuple(x.shape[:-1]))
    w = dequantize_weight(weight, antiquant_scale, antiquant_offset, antiquant_group_size, x.dtype)
    return fp_matmul(x, w, bias, x3)


# Largest m for which the portable W8A8 matmul uses torch._int_mm; above it, the exact fp32 GEMM
# on k-chunks of _EXACT_F32_K. On this AVX2 CPU torch._int_mm is a slow reference kernel: with
# the op benchmark's shapes it took 23 s for m=128, k=2048, n=4096 (python -m bench op, TP=2,
# 1 thread; 0.1 s for the fp32 GEMM). Switch point, measured for issue 9 (2 threads, shared
# AVX2 host, k = n = 4096, (n, k) weight storage, median ms of 3), _int_mm vs the fp32 k-chunk
# GEMM incl. its per-call weight upcast: m=1: 16 vs 67, m=4: 80 vs 128, m=8: 156 vs 119,
# m=16: 190 vs 173. ``python -m bench kernels`` tracks the W8A8 layer time against bf16.
W8A8_INT_MM_MAX_M = 6
# Every partial sum of <= 1024 int8 x int8 products is an integer of magnitude <= 1024 * 128 *
# 128 = 2^24, hence exact in float32 whatever the summation order.
_EXACT_F32_K = 1024


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 (m, k) @ int8 (k, n) -> int32 (wrapping like an int32 accumulator).

    CPU with m > W8A8_INT_MM_MAX_M: float32 GEMMs over k-chunks of 1024 (each exact, see
    _EXACT_F32_K), converted to int32 and summed; otherwise torch._int_mm."""
    if a.device.type != "cpu" or a.shape[0] <= W8A8_INT_MM_MAX_M:
        return torch._int_mm(a.contiguous(), b)
    k = a.shape[1]
    af, bf = a.float(), b.float()
    acc: torch.Tensor | None = None
    for s in range(0, k, _EXACT_F32_K):
        part = torch.mm(af[:, s : s + _EXACT_F32_K], bf[s : s + _EXACT_F32_K]).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    assert acc is not None
    return acc


def _dequant_scale_f32(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype in (torch.int64, torch.uint64):
        return unpack_quant_param(scale)[0]
    return scale.float()


def w8a8_output_dtype(dequant_scale: torch.Tensor) -> torch.dtype:
    """Output dtype of the W8A8 scenario by the dtype table: bf16 scale -> bf16, else fp16."""
    return torch.bfloat16 if dequant_scale.dtype == torch.bfloat16 else torch.float16


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
    (packed by trans_quant_param), float32 or bf16; pertoken_scale: float32 [m]; bias: int32
    (added to the accumulator) or, for a float bias, added after scaling. output_dtype:
    fp16 / bf16 (default by the dtype table: bf16 for a bf16 scale, else fp16), or int8 for
    re-quantization with the packed ``offset`` (``rint(acc * scale + offset)``, saturated).
    A float32 scale without pertoken_scale and with fp16 / int8 output loses its low 13
    mantissa bits (the vendor packs it internally, KERNELS.md).
    """
    if backend.select(x1) is backend.Backend.ASCEND:
        from ascend_ops import _npu

        return _npu.quant_matmul(
            x1,
            x2,
            scale,
            offset=offset,
            pertoken_scale=pertoken_scale,
            bias=bias,
            output_dtype=output_dtype,
            x3=x3,
        )
    lead = tuple(x1.shape[:-1])
    acc = _int_mm(_as_2d(x1), x2)
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias
    out_dtype = output_dtype or w8a8_output_dtype(scale)
    if scale.dtype == torch.float32 and pertoken_scale is None and out_dtype != torch.bfloat16:
        # The vendor packs such a scale with npu_trans_quant_param internally (KERNELS.md).
        s32 = truncate_scale(scale)
    elif scale.dtype in (torch.float32, torch.bfloat16):
        # [1] / [n] / [1, n] broadcast against (m, n); a bf16 scale is promoted to float32
        # exactly by the multiplication itself (no separate cast per call)
        s32 = scale
    else:
        s32 = _dequant_scale_f32(scale)
    y = acc.float() * s32
    if pertoken_scale is not None:
        y = y * pertoken_scale.reshape(-1, 1).float()
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.float()
    if out_dtype == torch.int8:
        if offset is not None:
            y = y + offset.float().reshape(1, -1)
        elif scale.dtype in (torch.int64, torch.uint64):
            y = y + unpack_quant_param(scale)[1].reshape(1, -1)
        return torch.round(y).clamp_(-128, 127).to(torch.int8).reshape(*lead, -1)
    return _finish(y, out_dtype, x3, lead)


def _per_axis(p: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape a [1] or [c] parameter to broadcast along ``axis`` of x."""
    if p.numel() == 1:
        return p.reshape(())
    ax = axis % x.dim()
    shape = [1] * x.dim()
    shape[ax] = -1
    return p.reshape(shape)


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
    (per-channel). Computed in float32; rounding half to even. Returns int8, input's shape.
    """
    if dtype not in (torch.int8, torch.qint8):
        raise ValueError(f"dtype: only int8 output is supported, got {dtype}")
    if backend.select(input) is backend.Backend.ASCEND:
        from ascend_ops import _npu

        return _npu.quantize(input, scales, zero_points, axis, div_mode)
    s = _per_axis(scales.float(), input, axis)
    y = input.float() / s if div_mode else input.float() * s
    if zero_points is not None:
        y = y + _per_axis(zero_points.float(), input, axis)
    return torch.round(y).clamp_(-128, 127).to(torch.int8)


def dynamic_quant(
    input: torch.Tensor, *, smooth_scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization (npu_dynamic_quant).

    input: (..., k) fp16/bf16. Returns (int8 of input's shape, float32 scale of shape
    input.shape[:-1]) with ``inv = 127 / rowmax(|x|)``, ``y = rint(x * inv)``, ``scale = 1/inv``;
    an all-zero row gets scale 1.
    """
    if backend.select(input) is backend.Backend.ASCEND:
        from ascend_ops import _npu

        return _npu.dynamic_quant(input, smooth_scales)
    x = input.float()
    if smooth_scales is not None:
        x = x * smooth_scales.float()
    rowmax = x.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(rowmax > 0, 127.0 / rowmax, torch.ones_like(rowmax))
    y = torch.round(x * inv).clamp_(-128, 127).to(torch.int8)
    return y, (1.0 / inv).squeeze(-1)


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
    """The fused op's per-rank value (everything but the all-reduce), by scenario.

    Same arguments and dtype rules as mm_all_reduce_base; the caller validates them.
    """
    if x1.dtype == torch.int8:
        return quant_matmul(
            x1,
            x2,
            dequant_scale,
            pertoken_scale=pertoken_scale,
            bias=bias,
            x3=x3,
            output_dtype=w8a8_output_dtype(dequant_scale),
        )
    if x2.dtype == torch.int8:
        return weight_quant_matmul(
            x1, x2, antiquant_scale, antiquant_offset, bias, antiquant_group_size, x3
        )
    if backend.select(x1) is backend.Backend.ASCEND:
        from ascend_ops import _npu

        return _npu.fp_matmul(x1, x2, bias, x3)
    return fp_matmul(x1, x2, bias, x3)
