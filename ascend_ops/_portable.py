"""Portable backend: the golden reference of every kernel, in plain torch + torch.distributed
(any device, any c10d backend). The per-rank math of each scenario is written once here and
shared by the fused op and the unfused (decode) path; ``kernels`` dispatches to it.

Rounding follows the Atlas A2 kernels (hicann/ops-transformer ``mc2/matmul_all_reduce``):

- FP (fp16 / bf16 / fp32): products accumulated in float32 (oneDNN's bf16 GEMM accumulates in
  fp32; fp16 is computed as an fp32 GEMM because CPU fp16 GEMM is slow), ``bias`` added in
  float32, one rounding to the output dtype. bf16 at small m (``BF16_GEMM_MAX_M``) with a bf16
  bias stays a bf16 ``matmul`` / ``addmm``, whose bias term is added to the fp32 accumulator
  before the rounding; otherwise the operands are upcast.
- W8A16: the weight is dequantized in the activation dtype as the vendor golden does
  (``w.to(dt) + offset`` rounded to dt, then ``* scale`` rounded to dt, ``antiquant_weight``),
  then the FP matmul. Exception, for speed at small m (decode): symmetric per-tensor /
  per-channel weights in the prepared layout (``prepare_w8a16_weight``), bf16 x and
  m <= ``W8A16_INT8PACK_MAX_M`` use ``torch._weight_int8pack_mm`` (see ``weight_quant_matmul``).
- W8A8: int8 x int8 products accumulated exactly in int32, int32 bias added to the
  accumulator, ``acc * dequant_scale [* pertoken_scale]`` in float32, one rounding. An
  int64/uint64 dequant scale is unpacked bit-exactly (float32 with its low 13 mantissa bits
  cleared).
- ``x3``, in every scenario, is added to the per-rank result AFTER its rounding to the output
  dtype, in the output dtype: fp16 in half precision, bf16 in float32 rounded again (one
  correctly rounded add either way: ``y + x3``). The kernel's AddX3 step reads the matmul
  output buffer (mc2/matmul_all_reduce/op_kernel/matmul_all_reduce_add_x3.h, called from
  matmul_all_reduce_base.h and the comm-int8 kernels).

The fused op then sums the per-rank values over the group with ``dist.all_reduce`` in the
output dtype (as HCCL sums the kernel's output buffer). Quantized communication
(comm_quant_scale_1/2, full quant only), per element of the per-rank value ``v``:

1. ``a = int8(rint(fp16(v / s1)))``: fp16 output divides in half precision, bf16 output in
   float32 and rounds to fp16 (mc2/matmul_all_reduce/op_kernel/matmul_all_reduce_quant_perchannel.h);
   computed as ``fp16(float32(v) / float32(s1))``, which equals the half-precision quotient
   (24 >= 2 * 11 + 2 bits: the double rounding is innocuous);
2. ``a`` exchanged by row chunks; ``r = int8(rint(fp16(sum_ranks(a) * float32(s1 / s2))))``
   with the sum and the product in float32 (matmul_all_reduce_quant_reduce_sum.h: fp32 -> fp16
   -> int8);
3. ``out = all_gather(r) * s2``, float32 product rounded once to the output dtype
   (matmul_all_reduce_dequant_perchannel.h; its fp16 product of an int8 value and an fp16 scale
   is exact in float32, so the one rounding is the same).

Assumptions (the vendor documents neither): round-half-to-even (CAST_RINT) and saturation to
[-128, 127] for every int8 conversion. The row exchange is emulated with one all_gather of the
int8 partials (every rank sums every row chunk itself): the arithmetic is the kernel's
reduce-scatter + all-gather, only the bytes moved differ. With world size 1 the same chain is
applied.

Collective failures: c10d's own error for a dead or stuck peer names neither the collective nor
the domain. Every collective here runs through ``_collective``, which re-raises a RuntimeError
naming the op, the hcom, this rank, the group's timeout and the likely cause.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType

import torch
import torch.distributed as dist

from ascend_ops.contract import MmAllReduceArgs, w8a8_output_dtype
from ascend_ops.hcom import resolve_hcom
from ascend_ops.quant_param import truncate_scale, unpack_quant_param

__all__ = [
    "BF16_GEMM_MAX_M",
    "W8A16_INT8PACK_MAX_M",
    "W8A8_INT_MM_MAX_M",
    "all_gather_last_dim",
    "all_reduce",
    "antiquant_weight",
    "dynamic_quant",
    "fp_matmul",
    "mm_all_reduce_base",
    "mm_local",
    "prepare_w8a16_weight",
    "quant_matmul",
    "quantize",
    "weight_quant_matmul",
]


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    # no reshape call for a 2-D x: every avoided tensor op is ~1 us of per-call overhead
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _unflatten(y: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """(m, n) -> lead + (n,) (no op for a 2-D input)."""
    return y if len(lead) == 1 else y.reshape(*lead, y.shape[-1])


def _add_x3(y: torch.Tensor, x3: torch.Tensor | None) -> torch.Tensor:
    """y: the rounded (m, n) result; ``y + x3`` in y's dtype (torch adds fp16 / bf16 in float32
    and rounds once, the kernel's AddX3 result)."""
    return y if x3 is None else y + x3.reshape(y.shape)


def _finish(
    acc: torch.Tensor, out_dtype: torch.dtype, x3: torch.Tensor | None, lead: tuple[int, ...]
) -> torch.Tensor:
    """acc: (m, n) float32 -> one rounding to out_dtype -> + x3 -> lead + (n,)."""
    return _unflatten(_add_x3(acc.to(out_dtype), x3), lead)


# Largest m for which fp_matmul keeps a bf16 GEMM; above it the operands are upcast and an fp32
# GEMM is used (same single rounding, different speed). Measured by bench/kernels_switch.py
# (bench/results/kernels_switch.txt); re-measure on CPUs with native bf16 GEMM.
BF16_GEMM_MAX_M = 32


def fp_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    x3: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP per-rank value ``round(x @ w + bias) + x3``.

    x: (m, k) or (b, s, k), fp16/bf16/fp32; w: (k, n) same dtype; bias: (n,); x3: like output.
    Returns (m, n) / (b, s, n) in x's dtype.
    """
    lead = tuple(x.shape[:-1])
    x2d = _as_2d(x)
    if (
        x.dtype == torch.bfloat16
        and x2d.shape[0] <= BF16_GEMM_MAX_M
        and (bias is None or bias.dtype == torch.bfloat16)
    ):
        # one bf16 GEMM: addmm adds its bf16 bias term to the fp32 accumulator before the
        # single rounding (checked in tests/test_kernels.py)
        y = torch.matmul(x2d, w) if bias is None else torch.addmm(bias, x2d, w)
        return _unflatten(_add_x3(y, x3), lead)
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


def antiquant_weight(
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The kernel's antiquant of a W8A16 weight: ``(weight + offset) * scale`` in ``dtype``
    (default: the scale's), each step rounded to dtype as the vendor golden does.
    weight: (k, n) int8 -> (k, n) dtype."""
    dt = dtype or antiquant_scale.dtype
    k, n = weight.shape
    w = weight.to(dt)
    if antiquant_offset is not None:
        w = w + _expand_antiquant(antiquant_offset.to(dt), k, n, antiquant_group_size)
    return w * _expand_antiquant(antiquant_scale.to(dt), k, n, antiquant_group_size)


# Largest m for which weight_quant_matmul uses torch._weight_int8pack_mm instead of antiquant +
# GEMM. Measured by bench/kernels_switch.py (bench/results/kernels_switch.txt): at k = n = 4096
# the int8 kernel wins up to ~300 rows on the AVX2 host; re-measure on other hosts.
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
        # the CPU kernel reads k in blocks: other k give garbage or crash. Measured: on AVX2
        # multiples of 8 are exact; on an AMX host k = 8, 24, 40, 56, 72, 136 are wrong or
        # segfault (n = 2, 3 at k = 8) while multiples of 16 are exact
        and weight.shape[0] % 16 == 0
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
    """W8A16 ``round(x @ ((weight + offset) * scale) + bias) + x3``.

    x: (m, k) or (b, s, k) fp16/bf16/fp32; weight: (k, n) int8; antiquant_scale / offset: [1],
    [n], [1, n] or [ceil(k/g), n] in x's dtype; bias: (n,) x's dtype or fp32. Output: x's dtype.

    Golden: antiquant_weight (``w * scale`` rounded to x's dtype) then fp_matmul. Fast path,
    when there is no offset, the scale is per-tensor or per-channel, the weight comes from
    prepare_w8a16_weight and m <= W8A16_INT8PACK_MAX_M and x is bf16:
    ``torch._weight_int8pack_mm(x, weight.t(), scale)`` = ``bf16(scale_n * sum_k x w)`` with
    fp32 accumulation. It differs from the golden in not rounding each ``w * scale`` to bf16
    (relative error <= 2^-9 per product; none when the scale is a power of two), so
    ``|fast - golden| <= 2^-9 * sum_k |x[m, k] * w[k, n] * scale_n|`` plus one output ulp and
    fp32 summation-order noise. A bias is then added in fp32 to the bf16 result, a second
    rounding (at most one more output ulp) that the golden path does not have.
    """
    x2d = _as_2d(x)
    if _int8pack_ok(x2d, weight, antiquant_scale, antiquant_offset, antiquant_group_size):
        n = weight.shape[1]
        scale = antiquant_scale
        if scale.dtype != x.dtype or scale.dim() != 1 or scale.shape[0] != n:
            # per-tensor / [1, n] / other dtype; the layers pass a prepared [n] scale as is
            scale = scale.to(x.dtype).reshape(-1).expand(n).contiguous()
        y = torch._weight_int8pack_mm(x2d.contiguous(), weight.t(), scale)
        if bias is not None:
            y = (y.float() + bias.float()).to(x.dtype)
        return _unflatten(_add_x3(y, x3), tuple(x.shape[:-1]))
    w = antiquant_weight(weight, antiquant_scale, antiquant_offset, antiquant_group_size, x.dtype)
    return fp_matmul(x, w, bias, x3)


# Largest m for which the portable W8A8 matmul uses torch._int_mm; above it, the exact fp32 GEMM
# on k-chunks of _EXACT_F32_K (torch._int_mm is a slow reference kernel on AVX2 CPUs). Measured
# with python -m bench kernels (bench/results/).
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


def _dequant_scale_f32(scale: torch.Tensor, pertoken: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The float32 dequant scale the kernel multiplies by."""
    if scale.dtype in (torch.int64, torch.uint64):
        return unpack_quant_param(scale)[0]
    if scale.dtype == torch.float32 and not pertoken and out_dtype != torch.bfloat16:
        # the vendor packs such a scale with npu_trans_quant_param internally (KERNELS.md)
        return truncate_scale(scale)
    # [1] / [n] / [1, n] broadcast against (m, n); a bf16 scale is promoted to float32
    # exactly by the multiplication itself (no separate cast per call)
    return scale


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
    """W8A8 ``round((x1 @ x2 + bias_int32) * scale [* pertoken_scale]) + x3``.

    x1: (m, k) or (b, s, k) int8; x2: (k, n) int8; scale: [1] / [n] / [1, n] as int64/uint64
    (packed by trans_quant_param), float32 or bf16; pertoken_scale: float32 [m]; bias: int32
    (added to the accumulator) or, for a float bias, added after scaling. output_dtype:
    fp16 / bf16 (default by the dtype table), or int8 for re-quantization with the packed
    ``offset`` (``rint(acc * scale + offset)``, saturated). A float32 scale without
    pertoken_scale and with fp16 / int8 output loses its low 13 mantissa bits.
    """
    lead = tuple(x1.shape[:-1])
    acc = _int_mm(_as_2d(x1), x2)
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias
    out_dtype = output_dtype or w8a8_output_dtype(scale)
    y = acc.float() * _dequant_scale_f32(scale, pertoken_scale is not None, out_dtype)
    if pertoken_scale is not None:
        y = y * pertoken_scale.reshape(-1, 1).float()
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.float()
    if out_dtype == torch.int8:
        if offset is not None:
            y = y + offset.float().reshape(1, -1)
        elif scale.dtype in (torch.int64, torch.uint64):
            y = y + unpack_quant_param(scale)[1].reshape(1, -1)
        return _sat_int8(y).reshape(*lead, -1)
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
    zero_points: torch.Tensor | None,
    axis: int,
    div_mode: bool,
) -> torch.Tensor:
    """Static int8 quantization: ``rint(x / scales + zero_points)`` (div_mode) or
    ``rint(x * scales + zero_points)`` in float32, saturated. Returns int8, input's shape."""
    s = _per_axis(scales.float(), input, axis)
    y = input.float() / s if div_mode else input.float() * s
    if zero_points is not None:
        y = y + _per_axis(zero_points.float(), input, axis)
    return _sat_int8(y)


def dynamic_quant(
    input: torch.Tensor, *, smooth_scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: ``inv = 127 / rowmax(|x|)``, ``y = rint(x * inv)``,
    ``scale = 1 / inv`` (1 for an all-zero row). input: (..., k) -> (int8 same shape, float32
    input.shape[:-1])."""
    x = input.float()
    if smooth_scales is not None:
        x = x * smooth_scales.float()
    rowmax = x.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(rowmax > 0, 127.0 / rowmax, torch.ones_like(rowmax))
    return _sat_int8(x * inv), (1.0 / inv).squeeze(-1)


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
    output_dtype: torch.dtype | None = None,
    ops: ModuleType | None = None,
) -> torch.Tensor:
    """The fused op's per-rank value (everything but the all-reduce), by scenario.

    output_dtype: W8A8 (int8 x1) only, default the dtype table's for ``dequant_scale``.
    ops: the module whose fp_matmul / weight_quant_matmul / quant_matmul compute it (default:
    this one; ``kernels`` passes itself to dispatch each call by backend).
    """
    ops = ops or sys.modules[__name__]
    if x1.dtype == torch.int8:
        assert dequant_scale is not None
        return ops.quant_matmul(
            x1,
            x2,
            dequant_scale,
            pertoken_scale=pertoken_scale,
            bias=bias,
            x3=x3,
            output_dtype=output_dtype or w8a8_output_dtype(dequant_scale),
        )
    if x2.dtype == torch.int8:
        assert antiquant_scale is not None
        return ops.weight_quant_matmul(
            x1, x2, antiquant_scale, antiquant_offset, bias, antiquant_group_size, x3
        )
    return ops.fp_matmul(x1, x2, bias, x3)


# -- the fused op and the collectives -----------------------------------------------------------


def _group_timeout(group: dist.ProcessGroup) -> float | None:
    """The group's collective timeout in seconds (c10d CPU backend options), if readable."""
    try:
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except Exception:
        return None


def _collective(op: str, hcom: str, group: dist.ProcessGroup, run: Callable[[], object]) -> None:
    """Run the collective ``run()``; a c10d failure becomes a RuntimeError that names the op,
    the communication domain, this rank and the likely cause (chained to the original)."""
    try:
        run()
    except RuntimeError as e:
        try:
            where = f"rank {dist.get_rank(group)} of {group.size()}"
        except Exception:
            where = f"world size {group.size()}"
        t = _group_timeout(group)
        within = f" within the group's timeout of {t:g} s" if t is not None else " in time"
        raise RuntimeError(
            f"{op} on communication domain {hcom!r} ({where}) failed: a peer rank died or did "
            f"not reach this collective{within} (or the ranks called different collectives); "
            f"see the other ranks' logs. c10d error: {e}"
        ) from e


def _sat_int8(t: torch.Tensor) -> torch.Tensor:
    """Round half to even and saturate to int8."""
    return torch.round(t).clamp_(-128, 127).to(torch.int8)


def mm_all_reduce_base(a: MmAllReduceArgs) -> torch.Tensor:
    """Validated arguments -> all-reduced output (see module docstring)."""
    group = resolve_hcom(a.hcom)
    v = mm_local(
        a.x1,
        a.x2,
        bias=a.bias,
        antiquant_scale=a.antiquant_scale,
        antiquant_offset=a.antiquant_offset,
        x3=a.x3,
        dequant_scale=a.dequant_scale,
        pertoken_scale=a.pertoken_scale,
        antiquant_group_size=a.antiquant_group_size,
    )
    if a.comm_quant_scale_1 is not None:
        assert a.comm_quant_scale_2 is not None
        return _comm_quant_all_reduce(v, a.hcom, group, a.comm_quant_scale_1, a.comm_quant_scale_2)
    if group is not None:
        _collective(
            "mm_all_reduce_base: all_reduce", a.hcom, group, lambda: dist.all_reduce(v, group=group)
        )
    return v


def _comm_quant_all_reduce(
    v: torch.Tensor,
    hcom: str,
    group: dist.ProcessGroup | None,
    s1: torch.Tensor,
    s2: torch.Tensor,
) -> torch.Tensor:
    n = v.shape[-1]
    s1f = s1.reshape(1, n).float()
    s2f = s2.reshape(1, n).float()
    a = _sat_int8((v.reshape(-1, n).float() / s1f).half().float())
    if group is None:
        total = a.float()
    else:
        parts = [torch.empty_like(a) for _ in range(group.size())]
        _collective(
            "mm_all_reduce_base: all_gather (quantized communication)",
            hcom,
            group,
            lambda: dist.all_gather(parts, a, group=group),
        )
        total = torch.stack(parts).float().sum(0)
    r = _sat_int8((total * (s1f / s2f)).half().float())
    return (r.float() * s2f).to(v.dtype).reshape(v.shape)


def all_reduce(x: torch.Tensor, hcom: str, inplace: bool = False) -> torch.Tensor:
    """Sum ``x`` over the domain ``hcom`` (identity for world size 1)."""
    group = resolve_hcom(hcom)
    if group is None:
        return x if inplace else x.clone()
    y = x if inplace else x.clone()
    _collective("all_reduce", hcom, group, lambda: dist.all_reduce(y, group=group))
    return y


def all_gather_last_dim(x: torch.Tensor, hcom: str) -> torch.Tensor:
    """(..., n) on every rank -> (..., n * world_size) in rank order (copy for world size 1)."""
    return _all_gather_along(x, hcom, -1, "all_gather")


# -- sequence-parallel MC2 ops ----------------------------------------------------------------
#
# Same precision model as mm_all_reduce_base: all_gather_base_mm gathers its input exactly
# (dist.all_gather_single, rank order), then computes the local matmul with float32
# accumulation and ONE rounding to the output dtype (kernels.fp_matmul / quant_matmul, the
# formulas shared with every other path); mm_reduce_scatter_base computes the per-rank value
# the same way, rounded once to the output dtype, then sums it over the group in the output
# dtype with dist.reduce_scatter_single (as HCCL reduces the kernel's output buffer) and keeps
# this rank's block of m / world_size rows. gloo implements both collectives in torch 2.13
# (checked with bf16 and int8 tensors), so no all_reduce + slice emulation is needed. torch 2.13
# names them all_gather_single / reduce_scatter_single (the *_tensor names are deprecated);
# older torch (the releases torch_npu 2.1 pairs with) has only the *_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _sp_local(
    x1: torch.Tensor,
    x2: torch.Tensor,
    x1_scale: torch.Tensor | None,
    x2_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(m, k) @ (k, n): FP, or int8 ``x1_scale * x2_scale * (x1 @ x2)`` (int32 accumulation)."""
    if x2_scale is None:
        return fp_matmul(x1, x2)
    pertoken = None if x1_scale is None else x1_scale.reshape(-1)
    return quant_matmul(
        x1, x2, x2_scale.reshape(-1), pertoken_scale=pertoken, output_dtype=out_dtype
    )


def all_gather_base_mm(
    input: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    x1_scale: torch.Tensor | None,
    x2_scale: torch.Tensor | None,
    gather_output: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated arguments -> (allgather(input) @ x2 [dequantized], gather_out or empty)."""
    group = resolve_hcom(hcom)
    if group is None:
        gathered, scales = input, x1_scale
    else:
        ws = group.size()
        gathered = input.new_empty((input.shape[0] * ws, input.shape[1]))
        x1c = input.contiguous()
        _collective(
            "all_gather_base_mm: all_gather",
            hcom,
            group,
            lambda: _all_gather_single(gathered, x1c, group=group),
        )
        scales = None
        if x1_scale is not None:
            scales = x1_scale.new_empty((x1_scale.shape[0] * ws, 1))
            s1c = x1_scale.contiguous()
            _collective(
                "all_gather_base_mm: all_gather (x1_scale)",
                hcom,
                group,
                lambda: _all_gather_single(scales, s1c, group=group),
            )
    out = _sp_local(gathered, x2, scales, x2_scale, out_dtype)
    if not gather_output:
        return out, input.new_empty((0,))
    return out, gathered if group is not None else input.clone()


def mm_reduce_scatter_base(
    input: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    x1_scale: torch.Tensor | None,
    x2_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Validated arguments -> this rank's (m / world_size, n) block of the summed matmul."""
    group = resolve_hcom(hcom)
    v = _sp_local(input, x2, x1_scale, x2_scale, out_dtype)
    if group is None:
        return v
    out = v.new_empty((v.shape[0] // group.size(), v.shape[1]))
    vc = v.contiguous()
    _collective(
        "mm_reduce_scatter_base: reduce_scatter",
        hcom,
        group,
        lambda: _reduce_scatter_single(out, vc, group=group),
    )
    return out


# -- unfused token-dim collectives (sequence-parallel decode / schemes the MC2 kernels refuse) --


def _all_gather_along(x: torch.Tensor, hcom: str, dim: int, what: str) -> torch.Tensor:
    """``x`` of every rank concatenated along ``dim`` in rank order, contiguous (a copy for
    world size 1); ``what`` names the collective in a failure."""
    group = resolve_hcom(hcom)
    if group is None:
        return x.clone()
    xc = x.movedim(dim, 0).contiguous()
    out = xc.new_empty((xc.shape[0] * group.size(), *xc.shape[1:]))
    _collective(what, hcom, group, lambda: _all_gather_single(out, xc, group=group))
    return out.movedim(0, dim).contiguous()


def all_gather_dim0(x: torch.Tensor, hcom: str) -> torch.Tensor:
    """(m, ...) on every rank -> (m * world_size, ...) in rank order (copy for world size 1)."""
    return _all_gather_along(x, hcom, 0, "all_gather_dim0")


def reduce_scatter_dim0(x: torch.Tensor, hcom: str) -> torch.Tensor:
    """(m, ...) summed over the ranks; rank r keeps rows [r * m / ws, (r + 1) * m / ws)."""
    group = resolve_hcom(hcom)
    if group is None:
        return x.clone()
    xc = x.contiguous()
    out = xc.new_empty((xc.shape[0] // group.size(), *xc.shape[1:]))
    _collective(
        "reduce_scatter_dim0", hcom, group, lambda: _reduce_scatter_single(out, xc, group=group)
    )
    return out
