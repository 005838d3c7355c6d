"""The public fused op ``mm_all_reduce_base`` and the unfused ``all_reduce``.

Both are registered as ``torch.library`` custom ops with fake implementations so that
``torch.compile(fullgraph=True)`` traces them as single opaque nodes (the collective runs
inside). In eager mode the Python wrapper calls the implementation directly, skipping the
dispatcher's per-call overhead; the results are the same.
"""

from __future__ import annotations

import torch

from ascend_ops import _portable, backend
from ascend_ops._validate import check_mm_all_reduce_base

__all__ = ["all_gather", "all_reduce", "mm_all_reduce_base"]


def _impl(
    x1: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    reduce_op: str,
    bias: torch.Tensor | None,
    antiquant_scale: torch.Tensor | None,
    antiquant_offset: torch.Tensor | None,
    x3: torch.Tensor | None,
    dequant_scale: torch.Tensor | None,
    pertoken_scale: torch.Tensor | None,
    comm_quant_scale_1: torch.Tensor | None,
    comm_quant_scale_2: torch.Tensor | None,
    comm_turn: int,
    antiquant_group_size: int,
) -> torch.Tensor:
    if backend.select(x1) is backend.Backend.ASCEND:
        from ascend_ops import _npu

        return _npu.mm_all_reduce_base(
            x1,
            x2,
            hcom,
            reduce_op=reduce_op,
            bias=bias,
            antiquant_scale=antiquant_scale,
            antiquant_offset=antiquant_offset,
            x3=x3,
            dequant_scale=dequant_scale,
            pertoken_scale=pertoken_scale,
            comm_quant_scale_1=comm_quant_scale_1,
            comm_quant_scale_2=comm_quant_scale_2,
            comm_turn=comm_turn,
            antiquant_group_size=antiquant_group_size,
        )
    return _portable.mm_all_reduce_base(
        x1,
        x2,
        hcom,
        bias,
        antiquant_scale,
        antiquant_offset,
        x3,
        dequant_scale,
        pertoken_scale,
        comm_quant_scale_1,
        comm_quant_scale_2,
        antiquant_group_size,
    )


@torch.library.custom_op("ascend_ops::mm_all_reduce_base", mutates_args=())
def _mm_all_reduce_base_op(
    x1: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    reduce_op: str,
    bias: torch.Tensor | None,
    antiquant_scale: torch.Tensor | None,
    antiquant_offset: torch.Tensor | None,
    x3: torch.Tensor | None,
    dequant_scale: torch.Tensor | None,
    pertoken_scale: torch.Tensor | None,
    comm_quant_scale_1: torch.Tensor | None,
    comm_quant_scale_2: torch.Tensor | None,
    comm_turn: int,
    antiquant_group_size: int,
) -> torch.Tensor:
    return _impl(
        x1,
        x2,
        hcom,
        reduce_op,
        bias,
        antiquant_scale,
        antiquant_offset,
        x3,
        dequant_scale,
        pertoken_scale,
        comm_quant_scale_1,
        comm_quant_scale_2,
        comm_turn,
        antiquant_group_size,
    )


@_mm_all_reduce_base_op.register_fake
def _mm_all_reduce_base_fake(
    x1,
    x2,
    hcom,
    reduce_op,
    bias,
    antiquant_scale,
    antiquant_offset,
    x3,
    dequant_scale,
    pertoken_scale,
    comm_quant_scale_1,
    comm_quant_scale_2,
    comm_turn,
    antiquant_group_size,
):
    if x1.dtype == torch.int8:
        dt = torch.bfloat16 if dequant_scale.dtype == torch.bfloat16 else torch.float16
    else:
        dt = x1.dtype
    return x1.new_empty((*x1.shape[:-1], x2.shape[1]), dtype=dt)


def mm_all_reduce_base(
    x1: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    *,
    reduce_op: str = "sum",
    bias: torch.Tensor | None = None,
    antiquant_scale: torch.Tensor | None = None,
    antiquant_offset: torch.Tensor | None = None,
    x3: torch.Tensor | None = None,
    dequant_scale: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    comm_quant_scale_1: torch.Tensor | None = None,
    comm_quant_scale_2: torch.Tensor | None = None,
    comm_turn: int = 0,
    antiquant_group_size: int = 0,
) -> torch.Tensor:
    """Row-parallel matmul fused with the all-reduce over ``hcom`` (torch_npu signature).

    ``output = allreduce_sum(x1 @ ((x2 + antiquant_offset) * antiquant_scale) + bias + x3)`` in
    FP / W8A16; ``allreduce_sum((x1 @ x2 + bias) * dequant_scale [* pertoken_scale] + x3)`` in
    W8A8 (int8 x1 and x2, int32 accumulation and bias).

    x1: (m, k) or (b, s, k), int8 / fp16 / bf16 (fp32: portable backend only), contiguous;
    x2: (k, n), same float dtype as x1, or int8; hcom: from ``ascend_ops.hcom_name(group)``.
    Returns (m, n) / (b, s, n): x1's dtype in FP / W8A16; fp16 or bf16 in W8A8 (bf16 when
    dequant_scale is bf16). bias and x3 are added on every rank, inside the sum: pass them on
    one rank only for a row-parallel layer. Every CONTRACT.md rule is checked before any work;
    violations raise TypeError / ValueError naming the argument and the rule id.
    """
    # non-tensor x1 / x2 reach the validation (C1 / C2 TypeError), not an AttributeError here
    ascend = backend.select(x1 if isinstance(x1, torch.Tensor) else None) is backend.Backend.ASCEND
    x2_format = None
    # under torch.compile the storage format of a fake tensor is unknown (the kernel checks it)
    if ascend and isinstance(x2, torch.Tensor) and not torch.compiler.is_compiling():
        from ascend_ops import layout

        x2_format = layout.get_format(x2)
    check_mm_all_reduce_base(
        x1,
        x2,
        hcom,
        reduce_op,
        bias,
        antiquant_scale,
        antiquant_offset,
        x3,
        dequant_scale,
        pertoken_scale,
        comm_quant_scale_1,
        comm_quant_scale_2,
        comm_turn,
        antiquant_group_size,
        ascend=ascend,
        x2_format=x2_format,
    )
    # compiled on Ascend, _impl traces the vendor op itself (torch.ops.npu.npu_mm_all_reduce_base,
    # which torchair lowers); the portable path stays one opaque ascend_ops custom op
    fn = _mm_all_reduce_base_op if torch.compiler.is_compiling() and not ascend else _impl
    return fn(
        x1,
        x2,
        hcom,
        reduce_op,
        bias,
        antiquant_scale,
        antiquant_offset,
        x3,
        dequant_scale,
        pertoken_scale,
        comm_quant_scale_1,
        comm_quant_scale_2,
        comm_turn,
        antiquant_group_size,
    )


@torch.library.custom_op("ascend_ops::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, hcom: str) -> torch.Tensor:
    return _portable.all_reduce(x, hcom, inplace=False)


@_all_reduce_op.register_fake
def _all_reduce_fake(x, hcom):
    return torch.empty_like(x)


def all_reduce(x: torch.Tensor, hcom: str, *, inplace: bool = False) -> torch.Tensor:
    """Sum ``x`` over the communication domain ``hcom`` (the unfused decode path).

    x: any shape and dtype the c10d backend supports. ``inplace=True`` reuses x's storage in
    eager mode (under torch.compile the op is always functional). World size 1: returns x
    (or a copy) without any collective.
    """
    if not isinstance(hcom, str) or not hcom:
        raise TypeError(
            f"hcom: must be a non-empty communication-domain name (str), got {hcom!r} (C4)"
        )
    if torch.compiler.is_compiling():
        return _all_reduce_op(x, hcom)
    return _portable.all_reduce(x, hcom, inplace=inplace)


@torch.library.custom_op("ascend_ops::all_gather", mutates_args=())
def _all_gather_op(x: torch.Tensor, hcom: str) -> torch.Tensor:
    return _portable.all_gather_last_dim(x, hcom)


@_all_gather_op.register_fake
def _all_gather_fake(x, hcom):
    from ascend_ops.hcom import resolve_hcom

    group = resolve_hcom(hcom)  # metadata only: the group's size
    ws = 1 if group is None else group.size()
    return x.new_empty((*x.shape[:-1], x.shape[-1] * ws))


def all_gather(x: torch.Tensor, hcom: str) -> torch.Tensor:
    """Concatenate ``x`` (..., n) from every rank of ``hcom`` along the last dim, in rank order:
    (..., n * world_size). Used by column-parallel layers with ``gather_output=True``."""
    if not isinstance(hcom, str) or not hcom:
        raise TypeError(
            f"hcom: must be a non-empty communication-domain name (str), got {hcom!r} (C4)"
        )
    if torch.compiler.is_compiling():
        return _all_gather_op(x, hcom)
    return _portable.all_gather_last_dim(x, hcom)
