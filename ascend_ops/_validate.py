"""The one place that enforces CONTRACT.md (rules C1-C14, Q1-Q9) for mm_all_reduce_base.

Every check runs on argument metadata only (dtype, shape, stride, device, format), before any
device work or collective, and raises TypeError (wrong type or dtype) or ValueError (wrong
shape, value or combination) whose message names the argument and cites the rule id.

Rules the op cannot check from its arguments:
- C11 (graph mode supported) is a capability, not a constraint on a call.
- C14 (all fused ops of a model share one communication domain) is a property of the whole
  model, not of one call; tp_layers enforces it by giving every layer the same TP context.
- The world-size part of C12 and the resolvability of ``hcom`` (C4) need the process group:
  they are checked by ``check_group`` when the backend resolves ``hcom``, still before any
  collective.
"""

from __future__ import annotations

import dataclasses
import enum

import torch

from ascend_ops.contract import (
    FORMAT_NZ,
    FP_DTYPES,
    FP_DTYPES_PORTABLE,
    INT_MAX,
    QUANT_DIM_MAX,
    SP_WORLD_SIZES_ASCEND,
    W8A8_DEQUANT_SCALE_DTYPES,
    WORLD_SIZES,
    w8a8_output_dtype,
)

__all__ = ["OpSpec", "Scenario", "check_group", "check_mm_all_reduce_base"]


class Scenario(enum.Enum):
    FP = "fp"
    W8A16 = "w8a16"
    W8A8 = "w8a8"


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What a validated call computes: scenario, sizes and the output's shape and dtype."""

    scenario: Scenario
    m: int
    k: int
    n: int
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype


def _err(cls: type[Exception], arg: str, msg: str, rule: str) -> Exception:
    return cls(f"{arg}: {msg} ({rule})")


def _is_transposed_nk(x2: torch.Tensor) -> bool:
    """x2 (k, n) is the transposed view of a contiguous (n, k) tensor."""
    return x2.dim() == 2 and x2.stride(0) == 1 and x2.stride(1) == x2.shape[0] and x2.shape[1] > 1


def _tensor(name: str, t: object, rule: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise _err(TypeError, name, f"must be a torch.Tensor, got {type(t).__name__}", rule)
    return t


def _shape_in(t: torch.Tensor, allowed: list[tuple[int, ...]]) -> bool:
    return tuple(t.shape) in allowed


def check_mm_all_reduce_base(
    x1: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
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
    *,
    ascend: bool = False,
    x2_format: int | None = None,
) -> OpSpec:
    """Check one call against CONTRACT.md. ``ascend``: the call goes to torch_npu (fp32 is then
    refused per C1, and an NZ x2 in the FP scenario per C2/KERNELS.md). ``x2_format``: x2's
    storage format id when known (29 = FRACTAL_NZ)."""
    x1 = _tensor("x1", x1, "C1")
    x2 = _tensor("x2", x2, "C2")
    _check_x1(x1, ascend)
    scenario = _check_x2(x1, x2, ascend, x2_format)
    m, k, n = _check_sizes(x1, x2)
    _check_options(hcom, reduce_op, comm_turn)
    tensors = {
        "x1": x1,
        "x2": x2,
        "bias": bias,
        "x3": x3,
        "antiquant_scale": antiquant_scale,
        "antiquant_offset": antiquant_offset,
        "dequant_scale": dequant_scale,
        "pertoken_scale": pertoken_scale,
        "comm_quant_scale_1": comm_quant_scale_1,
        "comm_quant_scale_2": comm_quant_scale_2,
    }
    _check_no_grad(tensors)
    _check_not_empty(x1, x2, m, k, n)
    if scenario is Scenario.W8A8:
        out_dtype = _check_w8a8(
            x1, x2, m, k, n, dequant_scale, pertoken_scale, antiquant_scale,
            antiquant_offset, antiquant_group_size,
        )  # fmt: skip
    else:
        out_dtype = x1.dtype
        _refuse_full_quant(dequant_scale, pertoken_scale)
        if scenario is Scenario.W8A16:
            _check_w8a16(x1, k, n, antiquant_scale, antiquant_offset, antiquant_group_size)
        else:
            _refuse_antiquant(antiquant_scale, antiquant_offset, antiquant_group_size, "non-quant")
    out_shape = (*x1.shape[:-1], n)
    _check_bias(bias, scenario, x1, n)
    _check_x3(x3, out_dtype, out_shape, x1)
    _check_comm_quant(comm_quant_scale_1, comm_quant_scale_2, scenario, out_dtype, n, x1)
    return OpSpec(scenario, m, k, n, out_shape, out_dtype)


def _check_x1(x1: torch.Tensor, ascend: bool) -> None:
    """C1: x1's dtype, rank and layout."""
    fp_ok = FP_DTYPES if ascend else FP_DTYPES_PORTABLE
    if x1.dtype != torch.int8 and x1.dtype not in fp_ok:
        names = "int8, float16 or bfloat16" + (
            "" if ascend else " (float32: portable backend only)"
        )
        where = " on the Ascend backend" if ascend else ""
        raise _err(TypeError, "x1", f"dtype must be {names}{where}, got {x1.dtype}", "C1")
    if x1.dim() not in (2, 3):
        raise _err(
            ValueError,
            "x1",
            f"must be 2-D (m, k) or 3-D (b, s, k), got shape {tuple(x1.shape)}",
            "C1",
        )
    if not x1.is_contiguous():
        raise _err(
            ValueError,
            "x1",
            "a transposed / non-contiguous x1 is not supported; call .contiguous()",
            "C1",
        )


def _check_x2(x1: torch.Tensor, x2: torch.Tensor, ascend: bool, x2_format: int | None) -> Scenario:
    """C2: x2's rank, dtype, device and format; the scenario the dtype pair selects."""
    where = " on the Ascend backend" if ascend else ""
    if x2.dim() != 2:
        raise _err(ValueError, "x2", f"must be 2-D (k, n), got shape {tuple(x2.shape)}", "C2")
    if x2.dtype != torch.int8 and x2.dtype not in (FP_DTYPES if ascend else FP_DTYPES_PORTABLE):
        raise _err(
            TypeError, "x2", f"dtype must be float16, bfloat16 or int8{where}, got {x2.dtype}", "C2"
        )
    if x2.device != x1.device:
        raise _err(ValueError, "x2", f"must be on x1's device {x1.device}, got {x2.device}", "C2")
    if x1.dtype == torch.int8:
        if x2.dtype != torch.int8:
            raise _err(
                TypeError, "x2", f"must be int8 when x1 is int8 (full quant), got {x2.dtype}", "C2"
            )
        return Scenario.W8A8
    if x2.dtype == torch.int8:
        return Scenario.W8A16
    if x2.dtype != x1.dtype:
        raise _err(
            TypeError,
            "x2",
            f"dtype must equal x1's ({x1.dtype}) in the non-quant scenario, got {x2.dtype}",
            "C2",
        )
    if ascend and x2_format == FORMAT_NZ:
        raise _err(
            ValueError,
            "x2",
            "FRACTAL_NZ weight is not supported in the non-quant scenario on Atlas A2; keep FP weights ND",
            "C2",
        )
    return Scenario.FP


def _check_sizes(x1: torch.Tensor, x2: torch.Tensor) -> tuple[int, int, int]:
    """C3: x2's k matches x1's. Returns (m, k, n)."""
    k = x1.shape[-1]
    if x2.shape[0] != k:
        raise _err(
            ValueError, "x2", f"shape[0] ({x2.shape[0]}) must equal x1's last dim k ({k})", "C3"
        )
    m = 1
    for d in x1.shape[:-1]:
        m *= d
    return m, k, x2.shape[1]


def _check_options(hcom: object, reduce_op: object, comm_turn: object) -> None:
    """C4, C5, C8: the non-tensor options."""
    if not isinstance(hcom, str) or not hcom:
        raise _err(
            TypeError,
            "hcom",
            f"must be a non-empty communication-domain name (str), got {hcom!r}",
            "C4",
        )
    if reduce_op != "sum":
        raise _err(ValueError, "reduce_op", f"only 'sum' is supported, got {reduce_op!r}", "C5")
    if isinstance(comm_turn, bool) or not isinstance(comm_turn, int) or comm_turn != 0:
        raise _err(ValueError, "comm_turn", f"only 0 is supported, got {comm_turn!r}", "C8")


def _check_no_grad(tensors: dict[str, object]) -> None:
    """C10: inference only; non-tensors are left to their own rule's type check."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise _err(
                ValueError,
                name,
                "requires grad: the op is inference only (no backward); call under torch.no_grad()/inference_mode() or detach",
                "C10",
            )


def _check_not_empty(x1: torch.Tensor, x2: torch.Tensor, m: int, k: int, n: int) -> None:
    """C12 (no empty tensor), C13 (m, k, n within int32)."""
    if x1.numel() == 0:
        raise _err(ValueError, "x1", f"must not be empty, got shape {tuple(x1.shape)}", "C12")
    if x2.numel() == 0:
        raise _err(ValueError, "x2", f"must not be empty, got shape {tuple(x2.shape)}", "C12")
    for name, v in (("m", m), ("k", k), ("n", n)):
        if v > INT_MAX:
            raise _err(
                ValueError,
                "x1" if name != "n" else "x2",
                f"{name} = {v} exceeds [1, 2^31-1]",
                "C13",
            )


def _refuse_full_quant(dequant_scale: object, pertoken_scale: object) -> None:
    """Q5, Q6: dequant / pertoken scales belong to the full-quant scenario only."""
    for name, t, rule in (
        ("dequant_scale", dequant_scale, "Q5"),
        ("pertoken_scale", pertoken_scale, "Q6"),
    ):
        if t is not None:
            raise _err(
                ValueError, name, "is only for the full-quant scenario (int8 x1 and x2)", rule
            )


def _check_bias(bias: object, scenario: Scenario, x1: torch.Tensor, n: int) -> None:
    """C6: bias dtype (int32 in W8A8, x1's otherwise), shape (n,), device."""
    if bias is None:
        return
    bias = _tensor("bias", bias, "C6")
    want = torch.int32 if scenario is Scenario.W8A8 else x1.dtype
    if bias.dtype != want:
        raise _err(
            TypeError,
            "bias",
            f"dtype must be {want} in the {scenario.value} scenario, got {bias.dtype}",
            "C6",
        )
    if bias.dim() != 1 or bias.shape[0] != n:
        raise _err(
            ValueError,
            "bias",
            f"must be 1-D of length n = {n}, got shape {tuple(bias.shape)}",
            "C6",
        )
    _same_device("bias", bias, x1, "C6")


def _check_x3(
    x3: object, out_dtype: torch.dtype, out_shape: tuple[int, ...], x1: torch.Tensor
) -> None:
    """C7: x3 has the output's dtype, shape and device."""
    if x3 is None:
        return
    x3 = _tensor("x3", x3, "C7")
    if x3.dtype != out_dtype:
        raise _err(
            TypeError,
            "x3",
            f"dtype must equal the output dtype {out_dtype}, got {x3.dtype}",
            "C7",
        )
    if tuple(x3.shape) != out_shape:
        raise _err(
            ValueError,
            "x3",
            f"shape must equal the output shape {out_shape}, got {tuple(x3.shape)}",
            "C7",
        )
    _same_device("x3", x3, x1, "C7")


def _check_comm_quant(
    s1: object, s2: object, scenario: Scenario, out_dtype: torch.dtype, n: int, x1: torch.Tensor
) -> None:
    """Q8: both comm-quant scales or neither, full quant only, output dtype, [n] / [1, n]."""
    if s1 is None and s2 is None:
        return
    if scenario is not Scenario.W8A8:
        name = "comm_quant_scale_1" if s1 is not None else "comm_quant_scale_2"
        raise _err(
            ValueError, name, "is supported only in the full-quant scenario (int8 x1 and x2)", "Q8"
        )
    if s1 is None or s2 is None:
        missing = "comm_quant_scale_1" if s1 is None else "comm_quant_scale_2"
        raise _err(
            ValueError,
            missing,
            "comm_quant_scale_1 and comm_quant_scale_2 must be given together",
            "Q8",
        )
    for name, t in (("comm_quant_scale_1", s1), ("comm_quant_scale_2", s2)):
        t = _tensor(name, t, "Q8")
        if t.dtype != out_dtype:
            raise _err(
                TypeError,
                name,
                f"dtype must equal the output dtype {out_dtype}, got {t.dtype}",
                "Q8",
            )
        if not _shape_in(t, [(n,), (1, n)]):
            raise _err(
                ValueError,
                name,
                f"shape must be [n] or [1, n] with n = {n}, got {tuple(t.shape)}",
                "Q8",
            )
        _same_device(name, t, x1, "Q8")
    assert isinstance(s1, torch.Tensor) and isinstance(s2, torch.Tensor)
    if s1.shape != s2.shape:
        raise _err(
            ValueError,
            "comm_quant_scale_2",
            f"shape must equal comm_quant_scale_1's {tuple(s1.shape)}, got {tuple(s2.shape)}",
            "Q8",
        )


def _same_device(name: str, t: torch.Tensor, x1: torch.Tensor, rule: str) -> None:
    if t.device != x1.device:
        raise _err(ValueError, name, f"must be on x1's device {x1.device}, got {t.device}", rule)


def _refuse_antiquant(
    scale: torch.Tensor | None, offset: torch.Tensor | None, g: object, scenario: str
) -> None:
    """Q1-Q3: the antiquant arguments belong to the W8A16 scenario only."""
    for name, t, rule in (("antiquant_scale", scale, "Q1"), ("antiquant_offset", offset, "Q2")):
        if t is not None:
            raise _err(
                ValueError,
                name,
                "is only for the weight-only quant scenario (int8 x2, float x1)",
                rule,
            )
    if g != 0:
        raise _err(
            ValueError,
            "antiquant_group_size",
            f"must be 0 in the {scenario} scenario, got {g}",
            "Q3",
        )


def _check_group_size(g: object, k: int) -> None:
    if isinstance(g, bool) or not isinstance(g, int):
        raise _err(
            TypeError, "antiquant_group_size", f"must be an int, got {type(g).__name__}", "Q3"
        )
    if g == 0:
        return
    if g < 32 or g % 32 != 0 or g > min(k - 1, INT_MAX):
        raise _err(
            ValueError,
            "antiquant_group_size",
            f"must be 0 or a multiple of 32 in [32, min(k - 1, INT_MAX)] = [32, {k - 1}], got {g}",
            "Q3",
        )


def _check_w8a16(
    x1: torch.Tensor,
    k: int,
    n: int,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    g: int,
) -> None:
    """Q1-Q4: the weight-only quant scenario's scale, sizes, group size and offset."""
    if scale is None:
        raise _err(
            ValueError,
            "antiquant_scale",
            "is required when x2 is int8 and x1 is float (weight-only quant)",
            "Q1",
        )
    scale = _tensor("antiquant_scale", scale, "Q1")
    if scale.dtype != x1.dtype:
        raise _err(
            TypeError,
            "antiquant_scale",
            f"dtype must equal x1's ({x1.dtype}), got {scale.dtype}",
            "Q1",
        )
    _same_device("antiquant_scale", scale, x1, "Q1")
    for name, v in (("k", k), ("n", n)):
        if v > QUANT_DIM_MAX:
            raise _err(
                ValueError,
                "x2",
                f"{name} = {v} exceeds [1, 65535] in the weight-only quant scenario",
                "Q4",
            )
    _check_group_size(g, k)
    if g > 0:
        groups = (k + g - 1) // g
        if tuple(scale.shape) != (groups, n):
            raise _err(
                ValueError,
                "antiquant_scale",
                f"per-group shape must be [ceil(k / antiquant_group_size), n] = [{groups}, {n}], got {tuple(scale.shape)}",
                "Q1",
            )
    elif not _shape_in(scale, [(1,), (n,), (1, n)]):
        raise _err(
            ValueError,
            "antiquant_scale",
            f"shape must be [1] (per-tensor), [n] or [1, n] (per-channel) with n = {n}, or per-group with antiquant_group_size > 0; got {tuple(scale.shape)}",
            "Q1",
        )
    _check_antiquant_offset(offset, scale, x1)


def _check_antiquant_offset(offset: object, scale: torch.Tensor, x1: torch.Tensor) -> None:
    """Q2: the offset has the scale's dtype and shape."""
    if offset is None:
        return
    offset = _tensor("antiquant_offset", offset, "Q2")
    if offset.dtype != scale.dtype:
        raise _err(
            TypeError,
            "antiquant_offset",
            f"dtype must equal antiquant_scale's ({scale.dtype}), got {offset.dtype}",
            "Q2",
        )
    if offset.shape != scale.shape:
        raise _err(
            ValueError,
            "antiquant_offset",
            f"shape must equal antiquant_scale's {tuple(scale.shape)}, got {tuple(offset.shape)}",
            "Q2",
        )
    _same_device("antiquant_offset", offset, x1, "Q2")


def _check_w8a8(
    x1: torch.Tensor,
    x2: torch.Tensor,
    m: int,
    k: int,
    n: int,
    dequant_scale: torch.Tensor | None,
    pertoken_scale: torch.Tensor | None,
    antiquant_scale: torch.Tensor | None,
    antiquant_offset: torch.Tensor | None,
    g: int,
) -> torch.dtype:
    """Q5, Q7 and the antiquant refusal of the full-quant scenario; returns the output dtype."""
    _refuse_antiquant(antiquant_scale, antiquant_offset, g, "full-quant")
    if k > QUANT_DIM_MAX:
        raise _err(ValueError, "x1", f"k = {k} exceeds [1, 65535] in the full-quant scenario", "Q7")
    if n > QUANT_DIM_MAX and not _is_transposed_nk(x2):
        raise _err(
            ValueError,
            "x2",
            f"n = {n} exceeds [1, 65535]; larger n is only allowed for a transposed (n, k) weight",
            "Q7",
        )
    if dequant_scale is None:
        raise _err(
            ValueError,
            "dequant_scale",
            "is required in the full-quant scenario (int8 x1 and x2)",
            "Q5",
        )
    dequant_scale = _tensor("dequant_scale", dequant_scale, "Q5")
    if dequant_scale.dtype not in W8A8_DEQUANT_SCALE_DTYPES:
        raise _err(
            TypeError,
            "dequant_scale",
            f"dtype must be int64/uint64 (packed), bfloat16 or float32, got {dequant_scale.dtype}",
            "Q5",
        )
    if not _shape_in(dequant_scale, [(1,), (n,), (1, n)]):
        raise _err(
            ValueError,
            "dequant_scale",
            f"shape must be [1] (per-tensor), [n] or [1, n] (per-channel) with n = {n}, got {tuple(dequant_scale.shape)}",
            "Q5",
        )
    _same_device("dequant_scale", dequant_scale, x1, "Q5")
    _check_pertoken_scale(pertoken_scale, dequant_scale, m, x1)
    return w8a8_output_dtype(dequant_scale)


def _check_pertoken_scale(
    pertoken_scale: object, dequant_scale: torch.Tensor, m: int, x1: torch.Tensor
) -> None:
    """Q6: float32 [m]; with it the dequant scale is float32 / bf16. Q9: without it a float32
    dequant scale must be packed."""
    if pertoken_scale is not None:
        pertoken_scale = _tensor("pertoken_scale", pertoken_scale, "Q6")
        if pertoken_scale.dtype != torch.float32:
            raise _err(
                TypeError,
                "pertoken_scale",
                f"dtype must be float32, got {pertoken_scale.dtype}",
                "Q6",
            )
        want = "[m]" if x1.dim() == 2 else "[b*s]"
        if tuple(pertoken_scale.shape) != (m,):
            raise _err(
                ValueError,
                "pertoken_scale",
                f"shape must be {want} = [{m}], got {tuple(pertoken_scale.shape)}",
                "Q6",
            )
        _same_device("pertoken_scale", pertoken_scale, x1, "Q6")
        if dequant_scale.dtype in (torch.int64, torch.uint64):
            raise _err(
                TypeError,
                "dequant_scale",
                "with pertoken_scale must be float32 (fp16 output) or bfloat16 (bf16 output), not a packed int64 scale (dtype table 3)",
                "Q6",
            )
    elif dequant_scale.dtype == torch.float32:
        raise _err(
            TypeError,
            "dequant_scale",
            "float32 without pertoken_scale must first be packed to int64 with trans_quant_param",
            "Q9",
        )


def check_group(world_size: int, hcom: str) -> None:
    """C12: the communication domain's size must be 1, 2, 4 or 8."""
    if world_size not in WORLD_SIZES:
        raise _err(
            ValueError,
            "hcom",
            f"communication domain {hcom!r} has world size {world_size}; supported: 1, 2, 4 or 8",
            "C12",
        )


# -- sequence-parallel MC2 ops: all_gather_base_mm (G1-G13), mm_reduce_scatter_base (R1-R13) ---
#
# Sources: Ascend/op-plugin docs/context/torch_npu-npu_all_gather_base_mm.md and
# torch_npu-npu_mm_reduce_scatter_base.md (the rules), op_plugin/ops/opapi/
# AllGatherBaseMatmulKernelNpuOpApi.cpp (output dtypes, gather_out, world_size check), the
# torch_npu meta functions (torch_npu/op_plugin/meta/_meta_registrations.py, 2.7.1 and 2.14.0)
# and the kernels' host checks in hicann/ops-transformer mc2/matmul_reduce_scatter/op_host/
# op_api/aclnn_matmul_reduce_scatter.cpp and mc2/all_gather_matmul/op_host/op_tiling/
# all_gather_matmul_tiling.cpp (k in [256, 65535), checked on x1's k). docs/MC2_FAMILY.md lists
# the rules in prose.

SP_K_MIN = 256
SP_K_MAX = 65535  # exclusive: k in [256, 65535)
SP_COMM_MODES = ("ai_cpu", "aiv")


@dataclasses.dataclass(frozen=True)
class SpSpec:
    """What a validated all_gather_base_mm / mm_reduce_scatter_base call computes.

    m, k: the rows and k of this rank's input; n: x2's columns; out_shape / out_dtype: the
    first output; gather_shape: all_gather_base_mm's gather_out ((0,) when not gathered),
    None for mm_reduce_scatter_base; comm_mode: the effective mode ("ai_cpu" when None)."""

    quantized: bool
    m: int
    k: int
    n: int
    world_size: int
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    gather_shape: tuple[int, ...] | None
    comm_mode: str


def _sp_int(name: str, v: object, rule: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(TypeError, name, f"must be an int, got {type(v).__name__}", rule)
    return v


def _check_sp_common(
    p: str,
    input: object,
    x2: object,
    hcom: object,
    world_size: object,
    bias: object,
    x1_scale: object,
    x2_scale: object,
    comm_turn: object,
    output_dtype: object,
    comm_mode: object,
    ascend: bool,
    x2_format: int | None,
) -> tuple[torch.Tensor, torch.Tensor, bool, int, str, torch.dtype]:
    """Rules shared by both ops; ``p`` is the rule prefix ("G" or "R"), the numbers match.
    Returns (input, x2, quantized, world_size, comm_mode, output dtype)."""
    x1 = _tensor("input", input, f"{p}1")
    w = _tensor("x2", x2, f"{p}2")
    fp_ok = FP_DTYPES if ascend else FP_DTYPES_PORTABLE
    where = " on the Ascend backend" if ascend else ""
    # 1: input
    if x1.dtype != torch.int8 and x1.dtype not in fp_ok:
        names = "float16, bfloat16 or int8" + (
            "" if ascend else " (float32: portable backend only)"
        )
        raise _err(TypeError, "input", f"dtype must be {names}{where}, got {x1.dtype}", f"{p}1")
    if x1.dim() != 2:
        raise _err(ValueError, "input", f"must be 2-D (m, k), got shape {tuple(x1.shape)}", f"{p}1")
    if not x1.is_contiguous():
        raise _err(
            ValueError,
            "input",
            "a transposed / non-contiguous input is not supported; call .contiguous()",
            f"{p}1",
        )
    if x1.numel() == 0:
        raise _err(ValueError, "input", f"must not be empty, got shape {tuple(x1.shape)}", f"{p}1")
    # 2: x2
    if w.dim() != 2:
        raise _err(ValueError, "x2", f"must be 2-D (k, n), got shape {tuple(w.shape)}", f"{p}2")
    if w.dtype != x1.dtype:
        raise _err(
            TypeError,
            "x2",
            f"dtype must equal input's ({x1.dtype}): int8 with int8 (quantized), else the same "
            f"float dtype; got {w.dtype}",
            f"{p}2",
        )
    if w.device != x1.device:
        raise _err(
            ValueError, "x2", f"must be on input's device {x1.device}, got {w.device}", f"{p}2"
        )
    if w.numel() == 0:
        raise _err(ValueError, "x2", f"must not be empty, got shape {tuple(w.shape)}", f"{p}2")
    # 3: k
    k = x1.shape[1]
    if w.shape[0] != k:
        raise _err(ValueError, "x2", f"shape[0] ({w.shape[0]}) must equal input's k ({k})", f"{p}3")
    if not SP_K_MIN <= k < SP_K_MAX:
        raise _err(ValueError, "input", f"k = {k} must be in [256, 65535)", f"{p}3")
    # 4: hcom, world_size
    if not isinstance(hcom, str) or not hcom:
        raise _err(
            TypeError,
            "hcom",
            f"must be a non-empty communication-domain name (str), got {hcom!r}",
            f"{p}4",
        )
    ws = _sp_int("world_size", world_size, f"{p}4")
    allowed = SP_WORLD_SIZES_ASCEND if ascend else WORLD_SIZES
    if ws not in allowed:
        names = "2, 4 or 8 on Atlas A2" if ascend else "1 (hcom 'local'), 2, 4 or 8"
        raise _err(ValueError, "world_size", f"must be {names}, got {ws}", f"{p}4")
    # 5: bias
    if bias is not None:
        raise _err(
            ValueError,
            "bias",
            "is not supported by the fused kernel (a non-zero bias is refused on Ascend); add "
            "the bias to the output after the call",
            f"{p}5",
        )
    # 6: scales. The scenario follows the dtypes; x1_scale is optional because torch_npu
    # decides "quantized" by x2_scale alone (Ascend/op-plugin op_plugin/ops/opapi/
    # AllGatherBaseMatmulKernelNpuOpApi.cpp: has_quant = x2_scale.has_value()), which also
    # gives the output dtypes of rule 10: int64 x2_scale -> float16, else output_dtype or bf16.
    quantized = x1.dtype == torch.int8
    if not quantized:
        for name, t in (("x1_scale", x1_scale), ("x2_scale", x2_scale)):
            if t is not None:
                raise _err(
                    ValueError,
                    name,
                    "is only for the quantized scenario (int8 input and x2)",
                    f"{p}6",
                )
    else:
        if x2_scale is None:
            raise _err(
                ValueError,
                "x2_scale",
                "is required in the quantized scenario (int8 input and x2): float32 or int64 "
                "(trans_quant_param) of shape (1, n)",
                f"{p}6",
            )
        s2 = _tensor("x2_scale", x2_scale, f"{p}6")
        if s2.dtype not in (torch.float32, torch.int64):
            raise _err(
                TypeError,
                "x2_scale",
                f"dtype must be float32 or int64 (packed by trans_quant_param), got {s2.dtype}",
                f"{p}6",
            )
        if tuple(s2.shape) != (1, w.shape[1]):
            raise _err(
                ValueError,
                "x2_scale",
                f"shape must be (1, n) = (1, {w.shape[1]}) (per-channel), got {tuple(s2.shape)}",
                f"{p}6",
            )
        _same_device("x2_scale", s2, x1, f"{p}6")
        if x1_scale is not None:
            s1 = _tensor("x1_scale", x1_scale, f"{p}6")
            if s1.dtype != torch.float32:
                raise _err(TypeError, "x1_scale", f"dtype must be float32, got {s1.dtype}", f"{p}6")
            if tuple(s1.shape) != (x1.shape[0], 1):
                raise _err(
                    ValueError,
                    "x1_scale",
                    f"shape must be (m, 1) = ({x1.shape[0]}, 1) (per-token, this rank's rows), "
                    f"got {tuple(s1.shape)}",
                    f"{p}6",
                )
            _same_device("x1_scale", s1, x1, f"{p}6")
    # 9: comm_turn
    if _sp_int("comm_turn", comm_turn, f"{p}9") != 0:
        raise _err(ValueError, "comm_turn", f"only 0 is supported, got {comm_turn!r}", f"{p}9")
    # 10: output_dtype
    if not quantized:
        if output_dtype is not None and output_dtype != x1.dtype:
            raise _err(
                ValueError,
                "output_dtype",
                f"is only for the quantized scenario; the output is input's dtype {x1.dtype}, "
                f"got {output_dtype}",
                f"{p}10",
            )
        out_dtype = x1.dtype
    elif x2_scale.dtype == torch.int64:
        if output_dtype is not None and output_dtype != torch.float16:
            raise _err(
                ValueError,
                "output_dtype",
                f"an int64 (packed) x2_scale gives a float16 output, got {output_dtype}",
                f"{p}10",
            )
        out_dtype = torch.float16
    else:
        if output_dtype is not None and output_dtype not in (torch.bfloat16, torch.float16):
            raise _err(
                ValueError,
                "output_dtype",
                f"must be None (bfloat16), torch.bfloat16 or torch.float16, got {output_dtype}",
                f"{p}10",
            )
        out_dtype = output_dtype or torch.bfloat16
    # 11: comm_mode
    if comm_mode is not None and comm_mode not in SP_COMM_MODES:
        raise _err(
            ValueError, "comm_mode", f"must be None, 'ai_cpu' or 'aiv', got {comm_mode!r}", f"{p}11"
        )
    mode = comm_mode or "ai_cpu"
    if quantized and mode != "aiv":
        raise _err(
            ValueError,
            "comm_mode",
            f"the quantized scenario needs comm_mode='aiv' ('ai_cpu' is FP only), got {comm_mode!r}",
            f"{p}11",
        )
    if ascend and x2_format == FORMAT_NZ and mode != "aiv":
        raise _err(
            ValueError,
            "x2",
            f"a FRACTAL_NZ x2 needs comm_mode='aiv', got {comm_mode!r}",
            f"{p}11",
        )
    # 12: inference only
    if torch.is_grad_enabled():
        for name, t in (("input", x1), ("x2", w), ("x1_scale", x1_scale), ("x2_scale", x2_scale)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise _err(
                    ValueError,
                    name,
                    "requires grad: the op has no backward; call under torch.no_grad() / "
                    "inference_mode() or detach",
                    f"{p}12",
                )
    return x1, w, quantized, ws, mode, out_dtype


def check_all_gather_base_mm(
    input: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    world_size: int,
    bias: torch.Tensor | None = None,
    x1_scale: torch.Tensor | None = None,
    x2_scale: torch.Tensor | None = None,
    gather_index: int = 0,
    gather_output: bool = True,
    comm_turn: int = 0,
    output_dtype: torch.dtype | None = None,
    comm_mode: str | None = None,
    *,
    ascend: bool = False,
    x2_format: int | None = None,
) -> SpSpec:
    """Rules G1-G13 (docs/MC2_FAMILY.md) on metadata only, before any collective."""
    x1, w, quantized, ws, mode, out_dtype = _check_sp_common(
        "G", input, x2, hcom, world_size, bias, x1_scale, x2_scale, comm_turn, output_dtype,
        comm_mode, ascend, x2_format,
    )  # fmt: skip
    if _sp_int("gather_index", gather_index, "G7") != 0:
        raise _err(
            ValueError,
            "gather_index",
            f"only 0 (gather input) is supported, got {gather_index!r}",
            "G7",
        )
    if not isinstance(gather_output, bool):
        raise _err(
            TypeError, "gather_output", f"must be a bool, got {type(gather_output).__name__}", "G8"
        )
    m, k = x1.shape
    n = w.shape[1]
    gather_shape = (m * ws, k) if gather_output else (0,)
    return SpSpec(quantized, m, k, n, ws, (m * ws, n), out_dtype, gather_shape, mode)


def check_mm_reduce_scatter_base(
    input: torch.Tensor,
    x2: torch.Tensor,
    hcom: str,
    world_size: int,
    reduce_op: str = "sum",
    bias: torch.Tensor | None = None,
    x1_scale: torch.Tensor | None = None,
    x2_scale: torch.Tensor | None = None,
    comm_turn: int = 0,
    output_dtype: torch.dtype | None = None,
    comm_mode: str | None = None,
    *,
    ascend: bool = False,
    x2_format: int | None = None,
) -> SpSpec:
    """Rules R1-R13 (docs/MC2_FAMILY.md) on metadata only, before any collective."""
    x1, w, quantized, ws, mode, out_dtype = _check_sp_common(
        "R", input, x2, hcom, world_size, bias, x1_scale, x2_scale, comm_turn, output_dtype,
        comm_mode, ascend, x2_format,
    )  # fmt: skip
    if reduce_op != "sum":
        raise _err(ValueError, "reduce_op", f"only 'sum' is supported, got {reduce_op!r}", "R7")
    m, k = x1.shape
    if m % ws != 0:
        raise _err(ValueError, "input", f"m = {m} must be divisible by world_size = {ws}", "R8")
    n = w.shape[1]
    return SpSpec(quantized, m, k, n, ws, (m // ws, n), out_dtype, None, mode)


def check_sp_group(world_size: int, group_size: int, hcom: str, rule: str) -> None:
    """G4 / R4: ``world_size`` must be the size of the domain ``hcom`` names ('local': 1)."""
    if world_size != group_size:
        raise _err(
            ValueError,
            "world_size",
            f"({world_size}) must equal the size of communication domain {hcom!r} ({group_size})",
            rule,
        )
