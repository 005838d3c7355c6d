"""Portable backend: plain torch + torch.distributed (any device, any c10d backend).

It is the golden reference for the fused kernel: the per-rank value comes from
``kernels.mm_local`` (the one formula per scenario, shared with the unfused decode path),
rounded once to the output dtype, then summed over the group with ``dist.all_reduce`` in the
output dtype (as HCCL sums the kernel's output buffer).

Quantized communication (comm_quant_scale_1/2, full-quant only) follows KERNELS.md:

1. ``v`` = the per-rank value in the output dtype;
2. ``a = int8(sat(rint(v / scale_1)))``, exchanged all-to-all by row chunks;
3. ``r = int8(sat(rint(sum_over_ranks(a) * (scale_1 / scale_2))))`` summed in float32;
4. ``out = all_gather(r) * scale_2`` in float32, rounded once to the output dtype.

Assumptions (the vendor documents neither): round-half-to-even (CAST_RINT, the mode of every
Atlas A2 int8 conversion) and saturation to [-128, 127] (HCCL's int8 cast saturates; wrapping
would turn an overflow into a sign flip). ``scale_1 / scale_2`` is computed in float32 from the
fp16/bf16 scales. The row exchange is emulated with one all_gather of the int8 partials (every
rank then sums every row chunk itself): the arithmetic is exactly the reduce-scatter +
all-gather of the kernel, only the bytes moved differ. With world size 1 the same quantize /
requantize / dequantize chain is applied, so results do not depend on the world size's code path.

Collective failures: c10d's own error for a dead or stuck peer names neither the collective nor
the domain (gloo: "Connection reset by peer", "Timed out waiting ... for recv"). Every collective
here runs through ``_collective``, which re-raises a RuntimeError naming the op, the hcom, this
rank, the group's timeout and the likely cause, chained to the original error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ascend_ops import kernels
from ascend_ops.hcom import resolve_hcom

__all__ = ["all_reduce", "mm_all_reduce_base"]


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
    return torch.round(t).clamp_(-128, 127).to(torch.int8)


def mm_all_reduce_base(
    x1: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    bias: torch.Tensor | None,
    antiquant_scale: torch.Tensor | None,
    antiquant_offset: torch.Tensor | None,
    x3: torch.Tensor | None,
    dequant_scale: torch.Tensor | None,
    pertoken_scale: torch.Tensor | None,
    comm_quant_scale_1: torch.Tensor | None,
    comm_quant_scale_2: torch.Tensor | None,
    antiquant_group_size: int,
) -> torch.Tensor:
    """Validated arguments -> all-reduced output (see module docstring)."""
    group = resolve_hcom(hcom)
    v = kernels.mm_local(
        x1,
        x2,
        bias=bias,
        antiquant_scale=antiquant_scale,
        antiquant_offset=antiquant_offset,
        x3=x3,
        dequant_scale=dequant_scale,
        pertoken_scale=pertoken_scale,
        antiquant_group_size=antiquant_group_size,
    )
    if comm_quant_scale_1 is not None:
        return _comm_quant_all_reduce(v, hcom, group, comm_quant_scale_1, comm_quant_scale_2)
    if group is not None:
        _collective(
            "mm_all_reduce_base: all_reduce", hcom, group, lambda: dist.all_reduce(v, group=group)
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
    a = _sat_int8(v.reshape(-1, n).float() / s1f)
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
    r = _sat_int8(total * (s1f / s2f))
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
    group = resolve_hcom(hcom)
    if group is None:
        return x.clone()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.size())]
    _collective("all_gather", hcom, group, lambda: dist.all_gather(parts, x, group=group))
    return torch.cat(parts, dim=-1)


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
        return kernels.fp_matmul(x1, x2)
    pertoken = None if x1_scale is None else x1_scale.reshape(-1)
    return kernels.quant_matmul(
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


def all_gather_dim0(x: torch.Tensor, hcom: str) -> torch.Tensor:
    """(m, ...) on every rank -> (m * world_size, ...) in rank order (copy for world size 1)."""
    group = resolve_hcom(hcom)
    if group is None:
        return x.clone()
    xc = x.contiguous()
    out = xc.new_empty((xc.shape[0] * group.size(), *xc.shape[1:]))
    _collective("all_gather_dim0", hcom, group, lambda: _all_gather_single(out, xc, group=group))
    return out


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
