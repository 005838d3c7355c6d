"""The Ascend backend: thin adapters from our kernel API to torch_npu's vendor kernels.

Every function imports torch_npu through ``backend.npu_module()`` (lazy; a process without a
working torch_npu gets ``NpuNotAvailableError``) and translates our conventions to the
vendor's (KERNELS.md, CONTRACT.md):

- ``npu_weight_quant_batchmatmul`` takes a 2-D x, a scale / offset in x's dtype and a bias in
  fp16 for fp16 x but fp32 for bf16 x; x is flattened to 2-D and the output reshaped back.
- ``npu_quant_matmul`` defaults to int8 output, so the output dtype is always passed (our
  default: the W8A8 dtype table, bf16 for a bf16 scale, else fp16); scales are passed 1-D, and
  x1 is flattened so that ``pertoken_scale`` is ``[b*s]`` as in the fused op.
- Neither vendor helper takes ``x3``: it is added here after the call, in fp32, with a second
  rounding to the output dtype (the fused op itself adds x3 inside the kernel).
- ``npu_quantize`` takes its output dtype as ``torch.qint8``; in div_mode its zero points must
  be int8 / uint8 / int32 / bf16, so float zero points are passed as int32 when integral, as
  bf16 when exactly representable, and rejected otherwise.
- The FP local matmul has no vendor helper: it is torch.matmul / torch.addmm on the NPU tensors
  (torch_npu's aten kernels, fp32 accumulation in the cube unit), x3 added afterwards.

- The sequence-parallel ops (``npu_all_gather_base_mm`` / ``npu_mm_reduce_scatter_base``) are
  one ``call`` each: releases before 2.7.1 have no x1_scale / x2_scale / output_dtype /
  comm_mode, so a quantized call (or a comm_mode) is refused there by name.
- Graph mode: the unfused decode collectives are torch's functional collectives
  (:func:`compiled_all_reduce`, :func:`compiled_all_gather`), which torchair lowers to HCCL.

Every vendor call goes through :func:`call`, which adapts to the installed torch_npu release:
it reads the op's schema once (``torch.ops.npu.<op>.default._schema``; the signature for a
pure-Python stand-in), passes only the keyword arguments that schema has, drops an absent one
whose value is None or the vendor default, and refuses any other value with a TypeError naming
the argument, the release and the op. A new vendor op's adapter is one ``call(...)``.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
import torch.distributed as dist

from ascend_ops import backend
from ascend_ops.contract import FUSED_KWARGS, w8a8_output_dtype

__all__ = [
    "all_gather_base_mm",
    "arg_names",
    "call",
    "compiled_all_gather",
    "compiled_all_reduce",
    "dynamic_quant",
    "fp_matmul",
    "hcom_name",
    "mm_all_reduce_base",
    "mm_reduce_scatter_base",
    "quant_matmul",
    "quantize",
    "trans_quant_param",
    "weight_quant_matmul",
]


# Values that mean "the vendor default" for arguments some releases lack (schema defaults in
# torch_npu/csrc/aten/npu_native_functions*.yaml of 2.1.0.post8 .. 2.14.0): passing one of them
# to a release without the argument is the same call as omitting it.
_NEUTRAL: dict[str, Any] = {
    "reduce_op": "sum",
    "comm_turn": 0,
    "antiquant_group_size": 0,
    "comm_quant_mode": 0,
    "round_mode": 0,
    "inner_precise": 0,
}

_arg_cache: weakref.WeakKeyDictionary[Any, dict[str, tuple[str, ...]]] = weakref.WeakKeyDictionary()


def arg_names(op: str) -> frozenset[str]:
    """Argument names of ``torch_npu.<op>`` in the installed release (read once, cached per
    torch_npu module object)."""
    return frozenset(_arg_names_tuple(op))


@torch.compiler.assume_constant_result
def _arg_names_tuple(op: str) -> tuple[str, ...]:
    # a constant for torch.compile: the schema of the installed release does not change
    mod = backend.npu_module()
    per_mod = _arg_cache.setdefault(mod, {})
    names = per_mod.get(op)
    if names is None:
        fn = getattr(mod, op, None)
        if fn is None:
            raise NotImplementedError(
                f"torch_npu {_version(mod)} has no {op} (needed by the Ascend backend)"
            )
        schema = getattr(getattr(fn, "default", None), "_schema", None)
        if schema is not None:
            names = tuple(a.name for a in schema.arguments)
        else:
            names = tuple(inspect.signature(fn).parameters)
        per_mod[op] = names
    return names


def _version(mod: Any) -> str:
    return str(getattr(mod, "__version__", "(unknown version)"))


def call(op: str, *args: Any, **kwargs: Any) -> Any:
    """``torch_npu.<op>(*args, **kwargs)`` with the keyword arguments the installed schema has.

    A keyword the schema lacks is dropped when it is None or its vendor default (``_NEUTRAL``),
    else refused: TypeError ``"<name>: torch_npu X.Y's <op> has no such argument ..."``.
    """
    names = _arg_names_tuple(op)
    kw: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in names:
            kw[name] = value
        elif value is None or (name in _NEUTRAL and _is_neutral(name, value)):
            continue
        else:
            mod = backend.npu_module()
            raise TypeError(
                f"{name}: torch_npu {_version(mod)}'s {op} has no such argument (got "
                f"{_describe(value)}); this release cannot run the call, upgrade torch_npu or "
                f"leave {name} unset"
            )
    return getattr(backend.npu_module(), op)(*args, **kw)


def _is_neutral(name: str, value: Any) -> bool:
    return not isinstance(value, torch.Tensor) and value == _NEUTRAL[name]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def _add_x3(y: torch.Tensor, x3: torch.Tensor | None) -> torch.Tensor:
    """``y + x3`` in fp32, rounded to y's dtype (x3 reshaped to y's shape)."""
    if x3 is None:
        return y
    return (y.float() + x3.reshape(y.shape).float()).to(y.dtype)


def mm_all_reduce_base(
    x1: torch.Tensor, x2: torch.Tensor, hcom: str, **kwargs: Any
) -> torch.Tensor:
    """``torch_npu.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs)``, keyword-only options as in
    the vendor signature (reduce_op, bias, antiquant_scale, antiquant_offset, x3,
    dequant_scale, pertoken_scale, comm_quant_scale_1/2, comm_turn, antiquant_group_size).

    The arguments are passed unchanged: the caller has validated them against CONTRACT.md
    (including Q9: a float32 dequant_scale without pertoken_scale is packed beforehand).
    """
    unknown = set(kwargs) - set(FUSED_KWARGS)
    if unknown:
        raise TypeError(f"mm_all_reduce_base: unexpected keyword arguments {sorted(unknown)}")
    x3 = kwargs.get("x3")
    if (
        x3 is not None
        and x1.dtype != torch.int8
        and "pertoken_scale" not in _arg_names_tuple("npu_mm_all_reduce_base")
    ):
        # Releases before pertoken_scale run the FP and W8A16 kernels with x3 as the output
        # buffer and return x3 (Ascend/op-plugin 6.0.rc1,
        # op_plugin/ops/base_ops/opapi/MatmulAllReduceBaseKernelNpuOpApi.cpp:
        # EXEC_NPU_CMD(aclnnMatmulAllReduceV2, ..., x3_real); return x3_real;); from 6.0.rc2
        # (op_plugin/ops/opapi/, the schema with pertoken_scale) the result is a fresh tensor.
        kwargs["x3"] = x3.clone()
    return call("npu_mm_all_reduce_base", x1, x2, hcom, **kwargs)


def all_gather_base_mm(
    input: torch.Tensor, x2: torch.Tensor, hcom: str, world_size: int, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch_npu.npu_all_gather_base_mm(input, x2, hcom, world_size, **kwargs)`` ->
    (output, gather_out); keyword options as in the vendor signature (validated by the caller,
    docs/MC2_FAMILY.md G1-G13). Releases before 2.7.1 have no x1_scale / x2_scale /
    output_dtype / comm_mode: a quantized call (or a comm_mode) is refused there by name."""
    return call("npu_all_gather_base_mm", input, x2, hcom, world_size, **kwargs)


def mm_reduce_scatter_base(
    input: torch.Tensor, x2: torch.Tensor, hcom: str, world_size: int, **kwargs: Any
) -> torch.Tensor:
    """``torch_npu.npu_mm_reduce_scatter_base(input, x2, hcom, world_size, **kwargs)`` -> this
    rank's (m / world_size, n) rows; rules R1-R13 checked by the caller, release differences
    handled as in :func:`all_gather_base_mm`."""
    return call("npu_mm_reduce_scatter_base", input, x2, hcom, world_size, **kwargs)


_hcom_cache: weakref.WeakKeyDictionary[
    Any, weakref.WeakKeyDictionary[dist.ProcessGroup, dict[int, str]]
] = weakref.WeakKeyDictionary()


def hcom_name(group: dist.ProcessGroup, rank: int) -> str:
    """HCCL communicator name of ``group`` as the vendor example obtains it:
    ``group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)``.

    ``rank`` is passed through unchanged (the vendor doc asks for the global rank id). Cached
    per (group, rank); the cache holds the group weakly.
    """
    mod = backend.npu_module()  # a clear NpuNotAvailableError rather than a missing "npu" backend
    # per torch_npu module object: a re-imported torch_npu (or a new test double) asks again
    per_group = _hcom_cache.setdefault(mod, weakref.WeakKeyDictionary()).setdefault(group, {})
    name = per_group.get(rank)
    if name is None:
        name = group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)
        per_group[rank] = name
    return name


def weight_quant_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    antiquant_group_size: int,
    x3: torch.Tensor | None,
    inner_precise: int = 0,
) -> torch.Tensor:
    """W8A16 via ``torch_npu.npu_weight_quant_batchmatmul``.

    x: (m, k) / (b, s, k) fp16/bf16; weight: (k, n) int8, ND or NZ. Scale / offset are cast to
    x's dtype; bias to fp16 (fp16 x) or fp32 (bf16 x). x3 is added after the call (fp32, second
    rounding). inner_precise: 0 (high precision) / 1 (high performance), on releases that have
    it. Returns x's shape with n last, x's dtype.
    """
    dt = x.dtype
    if bias is not None:
        bias = bias.to(torch.float16 if dt == torch.float16 else torch.float32)
    y = call(
        "npu_weight_quant_batchmatmul",
        x.reshape(-1, x.shape[-1]),
        weight,
        antiquant_scale.to(dt),
        antiquant_offset=None if antiquant_offset is None else antiquant_offset.to(dt),
        bias=bias,
        antiquant_group_size=antiquant_group_size,
        inner_precise=inner_precise,
    )
    return _add_x3(y, x3).reshape(*x.shape[:-1], y.shape[-1])


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
    group_sizes: list[int] | None = None,
) -> torch.Tensor:
    """W8A8 via ``torch_npu.npu_quant_matmul``.

    x1: (m, k) / (b, s, k) int8 (flattened to 2-D for the call); x2: (k, n) int8, ND or NZ;
    scale: int64 / float32 / bf16, passed 1-D (a bf16 scale as float32, below); offset: float32
    1-D (int8 output only); pertoken_scale: float32 [m] / [b*s]. output_dtype: default by the
    W8A8 dtype table (the vendor's own default would be int8). group_sizes: on releases that
    have it (2.7.1+). x3 is added after the call (fp32, second rounding).
    """
    out_dtype = output_dtype or w8a8_output_dtype(scale)
    if scale.dtype == torch.bfloat16:
        # bf16 output takes a float32 scale (op-plugin dtype table); vllm-ascend keeps the
        # dequant scale float32 for bf16 models (vllm_ascend/quantization/methods/
        # w8a8_static.py: deq_scale float32 when params_dtype is bf16, int64 for fp16). The
        # values are the bf16 ones, so decode matches the fused op, which takes bf16.
        scale = scale.float()
    y = call(
        "npu_quant_matmul",
        x1.reshape(-1, x1.shape[-1]),
        x2,
        scale.reshape(-1),
        offset=None if offset is None else offset.float().reshape(-1),
        pertoken_scale=None if pertoken_scale is None else pertoken_scale.float().reshape(-1),
        bias=bias,
        output_dtype=out_dtype,
        group_sizes=group_sizes,
    )
    if x3 is not None and out_dtype != torch.int8:
        y = _add_x3(y, x3)
    return y.reshape(*x1.shape[:-1], y.shape[-1])


def _zero_points_for_div_mode(zp: torch.Tensor) -> torch.Tensor:
    if zp.dtype in (torch.int8, torch.uint8, torch.int32, torch.bfloat16):
        return zp
    if not zp.is_floating_point():
        return zp.to(torch.int32)
    if torch.compiler.is_compiling():
        # no value-dependent branch in a graph: bf16 (exact for every integral offset in the
        # int8 range), checked when the graph runs
        as_bf16 = zp.to(torch.bfloat16)
        torch._assert_async(
            (as_bf16.to(zp.dtype) == zp).all(),
            "zero_points: npu_quantize (div_mode=True) takes int8/uint8/int32/bf16 zero points; "
            "these float values are not exact in bf16",
        )
        return as_bf16
    if bool((zp == torch.round(zp)).all()):
        return zp.to(torch.int32)
    as_bf16 = zp.to(torch.bfloat16)
    if bool((as_bf16.to(zp.dtype) == zp).all()):
        return as_bf16
    raise ValueError(
        "zero_points: npu_quantize (div_mode=True) takes int8/uint8/int32/bf16 zero points; "
        f"these {zp.dtype} values are neither integral nor exact in bf16"
    )


def quantize(
    input: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    axis: int,
    div_mode: bool,
) -> torch.Tensor:
    """Static int8 quantization via ``torch_npu.npu_quantize(..., torch.qint8, axis, div_mode)``.

    div_mode: scales as float32 (bf16 kept), zero points converted as the module docstring says.
    Not div_mode: zero points cast to the scales' dtype and shape, as the vendor requires.
    Returns int8 of input's shape.
    """
    if div_mode:
        if scales.dtype not in (torch.float32, torch.bfloat16):
            scales = scales.float()
        if zero_points is not None:
            zero_points = _zero_points_for_div_mode(zero_points)
    elif zero_points is not None:
        zero_points = zero_points.to(scales.dtype).reshape(scales.shape)
    return call("npu_quantize", input, scales, zero_points, torch.qint8, axis, div_mode)


def dynamic_quant(
    input: torch.Tensor, smooth_scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 via ``torch_npu.npu_dynamic_quant`` -> (int8 input-shaped, float32
    input.shape[:-1]); smooth_scales is cast to input's dtype (the vendor requires it)."""
    if smooth_scales is not None:
        smooth_scales = smooth_scales.to(input.dtype)
    y, scale = call("npu_dynamic_quant", input, smooth_scales=smooth_scales)
    return y, scale


def trans_quant_param(
    scale: torch.Tensor, offset: torch.Tensor | None = None, round_mode: int = 0
) -> torch.Tensor:
    """``torch_npu.npu_trans_quant_param(scale, offset[, round_mode])`` -> int64 (round_mode 1,
    round-to-nearest of the dropped mantissa bits, exists from 2.7.1 on)."""
    return call("npu_trans_quant_param", scale, offset, round_mode=round_mode)


def fp_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    bias: torch.Tensor | None = None,
    x3: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP local ``x1 @ x2 + bias + x3`` on the NPU: torch.addmm / torch.matmul on the device
    tensors (torch_npu's aten kernels), x3 added afterwards in fp32.

    x1: (m, k) / (b, s, k) fp16/bf16; x2: (k, n) ND (the Atlas A2 FP matmul rejects NZ);
    bias: (n,) x1's dtype. Returns x1's dtype.
    """
    backend.npu_module()
    x2d = x1.reshape(-1, x1.shape[-1])
    y = torch.matmul(x2d, x2) if bias is None else torch.addmm(bias.to(x1.dtype), x2d, x2)
    return _add_x3(y, x3).reshape(*x1.shape[:-1], x2.shape[-1])


# -- graph mode: the unfused collectives -----------------------------------------------------


@torch.compiler.assume_constant_result
def _group_name(hcom: str) -> str:
    # a constant for torch.compile: the c10d group name of hcom ("" for a world-size-1 domain)
    from ascend_ops.hcom import resolve_hcom

    group = resolve_hcom(hcom)
    return "" if group is None else group.group_name


def compiled_all_reduce(x: torch.Tensor, hcom: str) -> torch.Tensor:
    """Sum of x over hcom for a graph compiled on Ascend: torch's functional all_reduce, as
    torchair's own ``dist.all_reduce`` patch emits it (torch_npu dynamo/torchair/
    _ge_concrete_graph/ge_converter/experimental/hcom_allreduce.py: ``npu_allreduce_patch_dist``),
    which torchair lowers to HcomAllReduce (ge_converter/c10d_functional/c10d_functional.py).
    x: any shape; returns x's shape."""
    import torch.distributed._functional_collectives as funcol

    name = _group_name(hcom)
    if not name:
        return x.clone()
    # while tracing, funcol itself appends the wait_tensor
    return funcol.all_reduce(x, "sum", name)


def compiled_all_gather(x: torch.Tensor, hcom: str) -> torch.Tensor:
    """(..., n) -> (..., n * world_size) in rank order for a graph compiled on Ascend: torch's
    functional all_gather_tensor (an all_gather_into_tensor on dim 0, then a cat of the rank
    chunks along the last dim), which torchair lowers to HcomAllGather."""
    import torch.distributed._functional_collectives as funcol

    name = _group_name(hcom)
    if not name:
        return x.clone()
    return funcol.all_gather_tensor(x.contiguous(), x.dim() - 1, name)
