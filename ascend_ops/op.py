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
from ascend_ops.contract import MmAllReduceArgs, output_dtype

__all__ = [
    "all_gather",
    "all_gather_base_mm",
    "all_gather_dim0",
    "all_reduce",
    "mm_all_reduce_base",
    "mm_reduce_scatter_base",
    "reduce_scatter_dim0",
]


def _impl(a: MmAllReduceArgs) -> torch.Tensor:
    """Validated arguments -> the backend's fused op."""
    if backend.select(a.x1) is backend.Backend.ASCEND:
        from ascend_ops import _npu

        return _npu.mm_all_reduce_base(a.x1, a.x2, a.hcom, **a.keywords())
    return _portable.mm_all_reduce_base(a)


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
        MmAllReduceArgs(
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
    )


@_mm_all_reduce_base_op.register_fake
def _mm_all_reduce_base_fake(*args):
    a = MmAllReduceArgs(*args)
    out = (*a.x1.shape[:-1], a.x2.shape[1])
    return a.x1.new_empty(out, dtype=output_dtype(a.x1, a.dequant_scale))


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
    if ascend and isinstance(x2, torch.Tensor) and not torch.compiler.is_compiling():
        from ascend_ops import layout

        x2_format = layout.get_format(x2)
    args = MmAllReduceArgs(
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
    check_mm_all_reduce_base(*args, ascend=ascend, x2_format=x2_format)
    # compiled on Ascend, _impl traces the vendor op itself (torch.ops.npu.npu_mm_all_reduce_base,
    # which torchair lowers); the portable path stays one opaque ascend_ops custom op
    if torch.compiler.is_compiling() and not ascend:
        return _mm_all_reduce_base_op(*args)
    return _impl(args)


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
        if backend.select(x) is backend.Backend.ASCEND:
            from ascend_ops import _npu  # functional collectives torchair lowers

            return _npu.compiled_all_reduce(x, hcom)
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
        if backend.select(x) is backend.Backend.ASCEND:
            from ascend_ops import _npu  # functional collectives torchair lowers

            return _npu.compiled_all_gather(x, hcom)
        return _all_gather_op(x, hcom)
    return _portable.all_gather_last_dim(x, hcom)


# -- sequence-parallel MC2 ops ----------------------------------------------------------------


def _sp_x2_format(ascend: bool, x2: object) -> int | None:
    # as mm_all_reduce_base: no format query while tracing (get_npu_format has no fake impl)
    if ascend and isinstance(x2, torch.Tensor) and not torch.compiler.is_compiling():
        from ascend_ops import layout

        return layout.get_format(x2)
    return None


def _sp_check_group(hcom: str, world_size: int, rule: str) -> None:
    """G4 / R4 on the portable backend: world_size is the size of the group hcom names."""
    from ascend_ops._validate import check_sp_group
    from ascend_ops.hcom import resolve_hcom

    group = resolve_hcom(hcom)  # metadata only: C4 (known name) and the group's size
    check_sp_group(world_size, 1 if group is None else group.size(), hcom, rule)


def _ag_impl(
    input: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    world_size: int,
    x1_scale: torch.Tensor | None,
    x2_scale: torch.Tensor | None,
    gather_output: bool,
    output_dtype: torch.dtype | None,
    comm_mode: str | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend.select(input) is backend.Backend.ASCEND:
        from ascend_ops import _npu

        return _npu.all_gather_base_mm(
            input,
            x2,
            hcom,
            world_size,
            x1_scale=x1_scale,
            x2_scale=x2_scale,
            gather_output=gather_output,
            output_dtype=output_dtype,
            comm_mode=comm_mode,
        )
    return _portable.all_gather_base_mm(
        input, x2, hcom, x1_scale, x2_scale, gather_output, out_dtype
    )


@torch.library.custom_op("ascend_ops::all_gather_base_mm", mutates_args=())
def _all_gather_base_mm_op(
    input: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    world_size: int,
    x1_scale: torch.Tensor | None,
    x2_scale: torch.Tensor | None,
    gather_output: bool,
    output_dtype: torch.dtype | None,
    comm_mode: str | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _ag_impl(
        input, x2, hcom, world_size, x1_scale, x2_scale, gather_output, output_dtype,
        comm_mode, out_dtype,
    )  # fmt: skip


@_all_gather_base_mm_op.register_fake
def _all_gather_base_mm_fake(
    input, x2, hcom, world_size, x1_scale, x2_scale, gather_output, output_dtype, comm_mode,
    out_dtype,
):  # fmt: skip
    rows = input.shape[0] * world_size
    out = input.new_empty((rows, x2.shape[1]), dtype=out_dtype)
    gathered = input.new_empty((rows, input.shape[1]) if gather_output else (0,))
    return out, gathered


def all_gather_base_mm(
    input: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    world_size: int,
    *,
    bias: torch.Tensor | None = None,
    x1_scale: torch.Tensor | None = None,
    x2_scale: torch.Tensor | None = None,
    gather_index: int = 0,
    gather_output: bool = True,
    comm_turn: int = 0,
    output_dtype: torch.dtype | None = None,
    comm_mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather of the token-sharded input fused with the matmul (torch_npu signature).

    ``output = allgather(input) @ x2``; quantized (int8 input and x2):
    ``output = (allgather(x1_scale) * x2_scale) * (allgather(input) @ x2)``, int32 accumulation;
    ``gather_out = allgather(input)`` (rank order), or an empty (0,) tensor when
    ``gather_output=False``. ``input`` is the vendor's ``self`` / ``x1`` (the keyword torch_npu
    accepts for it is ``input``).

    input: (m, k) this rank's rows, fp16 / bf16 / int8 (fp32: portable only), contiguous,
    k in [256, 65535); x2: (k, n) same dtype (a transposed (n, k) view is fine); hcom: from
    ``ascend_ops.hcom_name(group)``; world_size: the domain's size. Quantized: x2_scale float32
    or int64 (trans_quant_param) (1, n), x1_scale float32 (m, 1) per token of this rank's rows
    (optional), comm_mode="aiv". Returns output (m * world_size, n): input's dtype (FP),
    float16 (int64 x2_scale) or output_dtype (default bfloat16); gather_out
    (m * world_size, k) in input's dtype. bias is refused (G5): add it to the output.
    Rules G1-G13 (docs/MC2_FAMILY.md) are checked before any collective.
    """
    ascend = backend.select(input if isinstance(input, torch.Tensor) else None) is (
        backend.Backend.ASCEND
    )
    from ascend_ops._validate import check_all_gather_base_mm

    spec = check_all_gather_base_mm(
        input, x2, hcom, world_size, bias, x1_scale, x2_scale, gather_index, gather_output,
        comm_turn, output_dtype, comm_mode, ascend=ascend, x2_format=_sp_x2_format(ascend, x2),
    )  # fmt: skip
    if not ascend:
        _sp_check_group(hcom, world_size, "G4")
    # compiled on Ascend, _ag_impl traces torch.ops.npu.npu_all_gather_base_mm (torchair lowers it)
    fn = _all_gather_base_mm_op if torch.compiler.is_compiling() and not ascend else _ag_impl
    return fn(
        input, x2, hcom, world_size, x1_scale, x2_scale, gather_output, output_dtype,
        comm_mode, spec.out_dtype,
    )  # fmt: skip


def _rs_impl(
    input: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    world_size: int,
    x1_scale: torch.Tensor | None,
    x2_scale: torch.Tensor | None,
    output_dtype: torch.dtype | None,
    comm_mode: str | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if backend.select(input) is backend.Backend.ASCEND:
        from ascend_ops import _npu

        return _npu.mm_reduce_scatter_base(
            input,
            x2,
            hcom,
            world_size,
            x1_scale=x1_scale,
            x2_scale=x2_scale,
            output_dtype=output_dtype,
            comm_mode=comm_mode,
        )
    return _portable.mm_reduce_scatter_base(input, x2, hcom, x1_scale, x2_scale, out_dtype)


@torch.library.custom_op("ascend_ops::mm_reduce_scatter_base", mutates_args=())
def _mm_reduce_scatter_base_op(
    input: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    world_size: int,
    x1_scale: torch.Tensor | None,
    x2_scale: torch.Tensor | None,
    output_dtype: torch.dtype | None,
    comm_mode: str | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _rs_impl(
        input, x2, hcom, world_size, x1_scale, x2_scale, output_dtype, comm_mode, out_dtype
    )


@_mm_reduce_scatter_base_op.register_fake
def _mm_reduce_scatter_base_fake(
    input, x2, hcom, world_size, x1_scale, x2_scale, output_dtype, comm_mode, out_dtype
):
    return input.new_empty((input.shape[0] // world_size, x2.shape[1]), dtype=out_dtype)


def mm_reduce_scatter_base(
    input: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    world_size: int,
    *,
    reduce_op: str = "sum",
    bias: torch.Tensor | None = None,
    x1_scale: torch.Tensor | None = None,
    x2_scale: torch.Tensor | None = None,
    comm_turn: int = 0,
    output_dtype: torch.dtype | None = None,
    comm_mode: str | None = None,
) -> torch.Tensor:
    """Matmul fused with the reduce-scatter of its output (torch_npu signature).

    ``output = reducescatter(input @ x2)``; quantized (int8 input and x2):
    ``output = reducescatter((x1_scale * x2_scale) * (input @ x2))``, int32 accumulation. Rank r
    keeps rows [r * m / ws, (r + 1) * m / ws) of the sum. ``input`` is the vendor's ``self``.

    input: (m, k) with m divisible by world_size (a row-parallel layer's k-shard of all m
    tokens), fp16 / bf16 / int8 (fp32: portable only), contiguous, k in [256, 65535); x2: (k, n)
    same dtype; quantized: x2_scale float32 / int64 (1, n), x1_scale float32 (m, 1) optional,
    comm_mode="aiv". Returns (m / world_size, n): input's dtype (FP), float16 (int64 x2_scale)
    or output_dtype (default bfloat16). bias is refused (R5). Rules R1-R13 (docs/MC2_FAMILY.md)
    are checked before any collective.
    """
    ascend = backend.select(input if isinstance(input, torch.Tensor) else None) is (
        backend.Backend.ASCEND
    )
    from ascend_ops._validate import check_mm_reduce_scatter_base

    spec = check_mm_reduce_scatter_base(
        input, x2, hcom, world_size, reduce_op, bias, x1_scale, x2_scale, comm_turn,
        output_dtype, comm_mode, ascend=ascend, x2_format=_sp_x2_format(ascend, x2),
    )  # fmt: skip
    if not ascend:
        _sp_check_group(hcom, world_size, "R4")
    fn = _mm_reduce_scatter_base_op if torch.compiler.is_compiling() and not ascend else _rs_impl
    return fn(
        input, x2, hcom, world_size, x1_scale, x2_scale, output_dtype, comm_mode, spec.out_dtype
    )


# -- unfused token-dim collectives ------------------------------------------------------------


def _check_hcom(hcom: object) -> None:
    if not isinstance(hcom, str) or not hcom:
        raise TypeError(
            f"hcom: must be a non-empty communication-domain name (str), got {hcom!r} (C4)"
        )


def _group_size(hcom: str) -> int:
    from ascend_ops.hcom import resolve_hcom

    group = resolve_hcom(hcom)  # metadata only: C4 and the group's size
    return 1 if group is None else group.size()


@torch.library.custom_op("ascend_ops::all_gather_dim0", mutates_args=())
def _all_gather_dim0_op(x: torch.Tensor, hcom: str) -> torch.Tensor:
    return _portable.all_gather_dim0(x, hcom)


@_all_gather_dim0_op.register_fake
def _all_gather_dim0_fake(x, hcom):
    return x.new_empty((x.shape[0] * _group_size(hcom), *x.shape[1:]))


def all_gather_dim0(x: torch.Tensor, hcom: str) -> torch.Tensor:
    """Concatenate ``x`` (m, ...) from every rank of ``hcom`` along dim 0 (the token dim of a
    sequence-parallel activation), in rank order: (m * world_size, ...). Every rank passes the
    same shape."""
    _check_hcom(hcom)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x: must be a tensor with at least one dim, got {type(x).__name__}")
    if torch.compiler.is_compiling():
        return _all_gather_dim0_op(x, hcom)
    return _portable.all_gather_dim0(x, hcom)


@torch.library.custom_op("ascend_ops::reduce_scatter_dim0", mutates_args=())
def _reduce_scatter_dim0_op(x: torch.Tensor, hcom: str) -> torch.Tensor:
    return _portable.reduce_scatter_dim0(x, hcom)


@_reduce_scatter_dim0_op.register_fake
def _reduce_scatter_dim0_fake(x, hcom):
    return x.new_empty((x.shape[0] // _group_size(hcom), *x.shape[1:]))


def reduce_scatter_dim0(x: torch.Tensor, hcom: str) -> torch.Tensor:
    """Sum ``x`` (m, ...) over ``hcom`` and keep this rank's block of rows along dim 0:
    rank r gets rows [r * m / ws, (r + 1) * m / ws) of the sum, (m / ws, ...). m must be
    divisible by the world size (checked before the collective)."""
    _check_hcom(hcom)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x: must be a tensor with at least one dim, got {type(x).__name__}")
    ws = _group_size(hcom)
    if x.shape[0] % ws:
        raise ValueError(f"x: dim 0 = {x.shape[0]} must be divisible by the world size {ws}")
    if torch.compiler.is_compiling():
        return _reduce_scatter_dim0_op(x, hcom)
    return _portable.reduce_scatter_dim0(x, hcom)
