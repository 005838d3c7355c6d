"""Strict test double of the ``torch_npu`` module, written from the vendor documentation only.

This module is an *independent oracle*: it imports nothing from the project's packages
(``ascend_ops``, ``quant``, ``tp_layers``), only ``torch``, ``torch.distributed`` and the
standard library. Sources: ``/work/shared/spec/npu_mm_all_reduce_base.zh.md`` (the vendor doc of
the fused op), ``CONTRACT.md`` (its English restatement, rules ``C1``-``C14`` / ``Q1``-``Q9``),
``KERNELS.md`` (helper kernels, rounding, FRACTAL_NZ, comm quant) and the torch_npu op-plugin
docs (signatures of the helper kernels).

Public API (attributes of a :class:`TorchNpuDouble` instance, i.e. of ``sys.modules['torch_npu']``
once installed):

* ``npu_mm_all_reduce_base(x1, x2, hcom, *, reduce_op='sum', bias=None, ...)``: validates every
  documented constraint, raises :class:`DoubleContractError` naming the rule on a violation,
  computes the documented formula per rank in float64 (W8A8: exact integer accumulation), rounds
  to the output dtype, then all-reduces (sum, in float32, rounded once to the output dtype) over
  the ``torch.distributed`` group named by ``hcom``.
* ``npu_trans_quant_param``, ``npu_quantize``, ``npu_dynamic_quant``, ``npu_quant_matmul``,
  ``npu_weight_quant_batchmatmul``: doc semantics (RINT = round half to even, int8 saturation).
* ``npu_all_gather_base_mm`` / ``npu_mm_reduce_scatter_base`` (op-plugin
  ``docs/context/torch_npu-npu_all_gather_base_mm.md`` / ``-npu_mm_reduce_scatter_base.md``):
  the docs' constraints, the rows gathered exactly in rank order, each rank's matmul in float64
  (int8: exact integer accumulation, then the scales) rounded once to the output dtype; the
  reduce-scatter sums those in float32, rounded once, and keeps this rank's rows.
* ``npu_format_cast(t, fmt)`` (fmt ``2`` = ND, ``29`` = FRACTAL_NZ) returns a fresh tensor with
  the same logical values; the format is recorded against the tensor's *storage*, so views
  (``.t()``), ``nn.Parameter`` wrappers and ``.data`` aliases keep it, like the real storage
  descriptor. ``get_npu_format(t)`` returns 2 or 29; ``double.is_nz(t)`` is the test helper.
* ``calls``: list of :class:`CallRecord` (``name``, ``args`` dict; tensors summarized as
  :class:`TensorInfo` with ``shape``, ``dtype``, ``format``, ``contiguous`` and ``tensor``;
  ``error`` holds the message when the call raised). ``double.calls_named(name)`` filters;
  ``double.reset()`` clears ``calls`` and ``comm_name_lookups``.
* ``npu``: a minimal submodule (``is_available()``, ``device_count()``, ``current_device()``,
  ``set_device(i)``, ``synchronize()``); see :class:`_NpuSubmodule`.

Communication names (``hcom``):

* With ``torch.distributed`` initialized, our library obtains the name exactly like the vendor
  example: ``group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)``, where ``rank``
  is the caller's GLOBAL rank (``dist.get_rank()``; the vendor doc of ``get_hccl_comm_name``
  says "传入的rankid为全局的rankid"). Installing the double patches
  ``ProcessGroup._get_backend`` so that for device type ``"npu"`` it returns a fake HCCL backend
  whose ``get_hccl_comm_name(rankid, init_comm=True)`` returns ``"hccl_<group_name>"`` and
  registers that name -> group (``double.comm_name_lookups`` counts the calls). Unknown names
  passed to the fused op raise :class:`DoubleContractError`.
* Without ``torch.distributed`` initialized (world size 1), pass the literal name
  ``"hccl_world_size_1"`` (:data:`SINGLE_PROCESS_HCOM`); it is accepted ONLY while
  ``torch.distributed`` is not initialized, and no collective runs. With ``dist`` initialized,
  even at world size 1, the name must come from the group lookup.

Install: the pytest fixture ``torch_npu_double`` (``tests/conftest.py``), or
:func:`install_double` / :func:`uninstall_double` inside spawned worker processes. Installing
also makes ``"npu"`` a valid device string (``torch.utils.rename_privateuse1_backend("npu")``,
irreversible per process, done once). The double accepts CPU tensors as stand-ins for npu tensors.
"""

from __future__ import annotations

import math
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "FORMAT_FRACTAL_NZ",
    "FORMAT_ND",
    "SINGLE_PROCESS_HCOM",
    "CallRecord",
    "DoubleContractError",
    "DoubleUnsupportedError",
    "TensorInfo",
    "TorchNpuDouble",
    "activate",
    "active_double",
    "deactivate",
    "install_double",
    "uninstall_double",
]

FORMAT_ND = 2
FORMAT_FRACTAL_NZ = 29
SINGLE_PROCESS_HCOM = "hccl_world_size_1"
"""hcom accepted by the double when ``torch.distributed`` is not initialized (world size 1)."""

_INT32_MAX = 2**31 - 1
_QUANT_DIM_MAX = 65535
_FP_DTYPES = (torch.float16, torch.bfloat16)
_WORLD_SIZES = (1, 2, 4, 8)


class DoubleContractError(RuntimeError):
    """A call broke a documented rule of a torch_npu op (the real kernel would fail)."""


class DoubleUnsupportedError(NotImplementedError):
    """A documented feature the double does not model (e.g. int4 packed in int32)."""


def _fail(rule: str, msg: str) -> None:
    raise DoubleContractError(f"[{rule}] {msg}")


def _require(cond: bool, rule: str, msg: str) -> None:
    if not cond:
        _fail(rule, msg)


# --------------------------------------------------------------------------------------------
# call recording
# --------------------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    """Summary of a tensor argument: ``shape``, ``dtype``, npu ``format`` (2/29), contiguity."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    format: int
    contiguous: bool
    tensor: torch.Tensor = field(repr=False)


@dataclass
class CallRecord:
    """One recorded call: op ``name``, ``args`` (tensors as :class:`TensorInfo`), ``error``."""

    name: str
    args: dict[str, Any]
    error: str | None = None

    def tensor(self, arg: str) -> torch.Tensor | None:
        """The tensor passed as ``arg`` (None if absent or not a tensor)."""
        v = self.args.get(arg)
        return v.tensor if isinstance(v, TensorInfo) else None


# --------------------------------------------------------------------------------------------
# rounding helpers
# --------------------------------------------------------------------------------------------


def _rint_saturate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round half to even (CAST_RINT) and saturate to the integer ``dtype``'s range."""
    info = torch.iinfo(dtype)
    return torch.round(x).clamp_(info.min, info.max).to(dtype)


def _f32_bits(t: torch.Tensor) -> torch.Tensor:
    """Unsigned float32 bit patterns of ``t`` (float32) as int64."""
    return t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _bits_f32(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_f32_bits`: low 32 bits of an int64 tensor reinterpreted as float32."""
    low = bits & 0xFFFFFFFF
    low = torch.where(low >= 2**31, low - 2**32, low)
    return low.to(torch.int32).view(torch.float32)


def _decode_packed_scale(packed: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode an int64/uint64 scale from ``npu_trans_quant_param``.

    Returns ``(scale float32, offset float32)``; both with ``packed``'s shape. Strict: bit 46
    must be set and bits 32-36 / 47-63 clear, i.e. the value must come from
    ``npu_trans_quant_param`` (a float scale merely cast with ``.long()`` is rejected).
    """
    bits = packed.view(torch.int64) if packed.dtype != torch.int64 else packed
    flag_ok = bool(((bits >> 46) & 1).eq(1).all())
    stray = bits & ~((1 << 46) | (0x1FF << 37) | 0xFFFFFFFF)
    _require(
        flag_ok and bool(stray.eq(0).all()),
        rule,
        "int64/uint64 scale is not a value packed by npu_trans_quant_param "
        "(bit 46 must be set, bits 32-36 and 47-63 clear)",
    )
    scale = _bits_f32(bits)
    off9 = (bits >> 37) & 0x1FF
    offset = torch.where(off9 >= 256, off9 - 512, off9).to(torch.float32)
    return scale, offset


def _truncate_f32_scale(scale: torch.Tensor) -> torch.Tensor:
    """float32 scale with its low 13 mantissa bits cleared (what the int64 packing keeps)."""
    return _bits_f32(_f32_bits(scale.to(torch.float32)) & 0xFFFFE000)


# --------------------------------------------------------------------------------------------
# storage-level format registry
# --------------------------------------------------------------------------------------------


class _FormatRegistry:
    """npu format per tensor *storage* (views and aliases share it); default ND."""

    def __init__(self) -> None:
        self._fmt: dict[int, tuple[weakref.ReferenceType[Any], int]] = {}

    def set(self, t: torch.Tensor, fmt: int) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if fmt == FORMAT_ND:
            self._fmt.pop(key, None)
            return
        fmts = self._fmt

        def _drop(_ref: Any, key: int = key) -> None:
            entry = fmts.get(key)
            if entry is not None and entry[0] is _ref:
                del fmts[key]

        self._fmt[key] = (weakref.ref(st, _drop), fmt)

    def get(self, t: torch.Tensor) -> int:
        st = t.untyped_storage()
        entry = self._fmt.get(st._cdata)
        if entry is None or entry[0]() is not st:
            return FORMAT_ND
        return entry[1]


# --------------------------------------------------------------------------------------------
# the fake HCCL backend and the ProcessGroup patch
# --------------------------------------------------------------------------------------------

_ACTIVE: TorchNpuDouble | None = None
_ORIG_GET_BACKEND: Callable[..., Any] | None = None


def active_double() -> TorchNpuDouble | None:
    """The currently installed double (None when not installed)."""
    return _ACTIVE


class _FakeHcclBackend:
    """What ``group._get_backend(torch.device("npu"))`` returns under the double."""

    def __init__(self, double: TorchNpuDouble, group: dist.ProcessGroup) -> None:
        self._double = double
        self._group = group

    def get_hccl_comm_name(self, rankid: int, init_comm: bool = True) -> str:
        """``"hccl_<group_name>"``; ``rankid`` must be the caller's GLOBAL rank."""
        self._double.comm_name_lookups += 1
        _require(dist.is_initialized(), "C4", "get_hccl_comm_name needs init_process_group")
        _require(
            isinstance(rankid, int) and rankid == dist.get_rank(),
            "C4",
            f"get_hccl_comm_name(rankid={rankid!r}): rankid must be this process's global rank "
            f"{dist.get_rank()} (vendor doc: 传入的rankid为全局的rankid)",
        )
        name = f"hccl_{self._group.group_name}"
        if not init_comm and name not in self._double._comms:
            return ""
        self._double._comms[name] = self._group
        return name

    def rank(self) -> int:
        return self._group.rank()

    def size(self) -> int:
        return self._group.size()


def _patched_get_backend(self: dist.ProcessGroup, device: Any) -> Any:
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "npu" and _ACTIVE is not None:
        return _FakeHcclBackend(_ACTIVE, self)
    assert _ORIG_GET_BACKEND is not None
    return _ORIG_GET_BACKEND(self, device)


def _ensure_npu_device_name() -> None:
    """Rename privateuse1 to "npu" (as torch_npu does) and give it a device module.

    Both are irreversible per process. The real torch_npu registers ``torch.npu``; without one,
    torch.accelerator (hence every later torch.compile in the process) fails on the renamed
    backend. The module registered here reports no device: the double's tensors live on CPU.
    """
    name = torch._C._get_privateuse1_backend_name()
    if name != "npu":
        if name != "privateuseone":
            raise RuntimeError(f"privateuse1 backend already renamed to {name!r}; cannot use 'npu'")
        torch.utils.rename_privateuse1_backend("npu")
    if not hasattr(torch, "npu"):
        stub = types.ModuleType("torch.npu")
        stub.is_available = lambda: False  # type: ignore[attr-defined]
        stub.device_count = lambda: 0  # type: ignore[attr-defined]
        stub._is_in_bad_fork = lambda: False  # type: ignore[attr-defined]
        stub.manual_seed_all = lambda seed: None  # type: ignore[attr-defined]
        torch.npu = stub  # type: ignore[attr-defined]


def _patch_process_group() -> None:
    global _ORIG_GET_BACKEND
    if _ORIG_GET_BACKEND is None:
        # the class __dict__ entry (pybind's instancemethod), not the attribute: restoring an
        # attribute fetched from the class would lose the binding of ``self``
        _ORIG_GET_BACKEND = dist.ProcessGroup.__dict__["_get_backend"]
        dist.ProcessGroup._get_backend = _patched_get_backend  # type: ignore[method-assign]


def _unpatch_process_group() -> None:
    global _ORIG_GET_BACKEND
    if _ORIG_GET_BACKEND is not None:
        dist.ProcessGroup._get_backend = _ORIG_GET_BACKEND  # type: ignore[method-assign]
        _ORIG_GET_BACKEND = None


def activate(double: TorchNpuDouble) -> None:
    """Make ``double`` the target of the ProcessGroup patch and apply the patch (no
    ``sys.modules`` change; the pytest fixture does that with monkeypatch)."""
    global _ACTIVE
    _ensure_npu_device_name()
    _ACTIVE = double
    _patch_process_group()


def deactivate() -> None:
    """Undo :func:`activate` (the 'npu' device-name rename is irreversible and stays)."""
    global _ACTIVE
    _ACTIVE = None
    _unpatch_process_group()


def install_double() -> TorchNpuDouble:
    """Install a fresh double as ``sys.modules['torch_npu']`` and patch ProcessGroup.

    For spawned worker processes (no pytest fixtures there). Returns the double.
    """
    double = TorchNpuDouble()
    activate(double)
    sys.modules["torch_npu"] = double
    sys.modules["torch_npu.npu"] = double.npu
    return double


def uninstall_double() -> None:
    """Undo :func:`install_double`."""
    deactivate()
    for key in ("torch_npu", "torch_npu.npu"):
        if isinstance(sys.modules.get(key), (TorchNpuDouble, _NpuSubmodule)):
            del sys.modules[key]


# --------------------------------------------------------------------------------------------
# the module double
# --------------------------------------------------------------------------------------------


class _NpuSubmodule(types.ModuleType):
    """Minimal ``torch_npu.npu``: ``is_available()`` returns ``available`` (default True:
    the double stands in for an NPU), ``device_count()`` 1, ``current_device()`` the last
    ``set_device`` index (default 0), ``synchronize()`` no-op. Tensors stay on CPU."""

    def __init__(self) -> None:
        super().__init__("torch_npu.npu")
        self.available = True
        self._device = 0

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return 1 if self.available else 0

    def current_device(self) -> int:
        return self._device

    def set_device(self, device: int | str | torch.device) -> None:
        if isinstance(device, int):
            self._device = device
        else:
            self._device = torch.device(device).index or 0

    def synchronize(self, device: Any = None) -> None:
        return None


def _numel_prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


class TorchNpuDouble(types.ModuleType):
    """Strict stand-in for the ``torch_npu`` module (see the module docstring)."""

    FORMAT_ND = FORMAT_ND
    FORMAT_FRACTAL_NZ = FORMAT_FRACTAL_NZ
    SINGLE_PROCESS_HCOM = SINGLE_PROCESS_HCOM
    DoubleContractError = DoubleContractError

    def __init__(self) -> None:
        super().__init__("torch_npu")
        self.__file__ = __file__
        self.calls: list[CallRecord] = []
        self.comm_name_lookups = 0
        self._comms: dict[str, dist.ProcessGroup] = {}
        self._formats = _FormatRegistry()
        self.npu = _NpuSubmodule()

    # ---------------------------------------------------------------- bookkeeping

    def reset(self) -> None:
        """Clear ``calls`` and ``comm_name_lookups`` (formats and registered names stay)."""
        self.calls.clear()
        self.comm_name_lookups = 0

    def calls_named(self, name: str) -> list[CallRecord]:
        """Recorded calls of op ``name`` (e.g. ``"npu_mm_all_reduce_base"``)."""
        return [c for c in self.calls if c.name == name]

    def is_nz(self, t: torch.Tensor) -> bool:
        """True when ``t``'s storage was produced by ``npu_format_cast(..., 29)``."""
        return self._formats.get(t) == FORMAT_FRACTAL_NZ

    def _summarize(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return TensorInfo(tuple(v.shape), v.dtype, self._formats.get(v), v.is_contiguous(), v)
        return v

    def _record(self, name: str, args: dict[str, Any]) -> CallRecord:
        rec = CallRecord(name, {k: self._summarize(v) for k, v in args.items()})
        self.calls.append(rec)
        return rec

    def _run(self, name: str, args: dict[str, Any], impl: Callable[[], Any]) -> Any:
        rec = self._record(name, args)
        try:
            return impl()
        except (DoubleContractError, DoubleUnsupportedError) as e:
            rec.error = str(e)
            raise

    # ---------------------------------------------------------------- formats

    def npu_format_cast(self, input: torch.Tensor, acl_format: int) -> torch.Tensor:
        """Copy of ``input`` (same logical values, contiguous) in format 2 (ND) or 29 (NZ)."""
        return self._run(
            "npu_format_cast",
            {"input": input, "acl_format": acl_format},
            lambda: self._format_cast(input, acl_format),
        )

    def _format_cast(self, t: torch.Tensor, fmt: int) -> torch.Tensor:
        _require(isinstance(t, torch.Tensor), "format", "npu_format_cast: input must be a Tensor")
        _require(
            fmt in (FORMAT_ND, FORMAT_FRACTAL_NZ),
            "format",
            f"npu_format_cast: format {fmt!r} not modeled (2 = ND, 29 = FRACTAL_NZ)",
        )
        if fmt == FORMAT_FRACTAL_NZ:
            _require(t.dim() >= 2, "format", "FRACTAL_NZ needs a tensor of at least 2 dims")
        out = t.detach().clone(memory_format=torch.contiguous_format)
        self._formats.set(out, fmt)
        return out

    def get_npu_format(self, input: torch.Tensor) -> int:
        """2 (ND) or 29 (FRACTAL_NZ)."""
        return self._formats.get(input)

    # ---------------------------------------------------------------- hcom resolution

    def _resolve_hcom(self, hcom: Any) -> tuple[dist.ProcessGroup | None, int]:
        _require(isinstance(hcom, str) and hcom != "", "C4", f"hcom must be a name, got {hcom!r}")
        if not dist.is_initialized():
            _require(
                hcom == SINGLE_PROCESS_HCOM,
                "C4",
                f"unknown hcom {hcom!r}: torch.distributed is not initialized, the only valid "
                f"name is {SINGLE_PROCESS_HCOM!r}",
            )
            return None, 1
        group = self._comms.get(hcom)
        _require(
            group is not None,
            "C4",
            f"unknown hcom {hcom!r}: not obtained from "
            "group._get_backend(torch.device('npu')).get_hccl_comm_name(rank) in this process",
        )
        assert group is not None
        return group, group.size()

    # ---------------------------------------------------------------- fused op

    def npu_mm_all_reduce_base(
        self,
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
        """Fused matmul + all-reduce.

        x1 ``(m, k)`` / ``(b, s, k)`` fp16/bf16/int8; x2 ``(k, n)``; output ``(m, n)`` /
        ``(b, s, n)``, dtype x1's (FP, W8A16) or fp16/bf16 chosen by ``dequant_scale`` (W8A8).
        """
        args = dict(
            x1=x1, x2=x2, hcom=hcom, reduce_op=reduce_op, bias=bias,
            antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset, x3=x3,
            dequant_scale=dequant_scale, pertoken_scale=pertoken_scale,
            comm_quant_scale_1=comm_quant_scale_1, comm_quant_scale_2=comm_quant_scale_2,
            comm_turn=comm_turn, antiquant_group_size=antiquant_group_size,
        )  # fmt: skip
        return self._run("npu_mm_all_reduce_base", args, lambda: self._mm_all_reduce(**args))

    def _mm_all_reduce(
        self,
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
        # ---- general rules
        _require(reduce_op == "sum", "C5", f"reduce_op must be 'sum', got {reduce_op!r}")
        _require(comm_turn == 0, "C8", f"comm_turn must be 0, got {comm_turn!r}")
        _require(isinstance(x1, torch.Tensor), "C1", "x1 must be a Tensor")
        _require(isinstance(x2, torch.Tensor), "C2", "x2 must be a Tensor")
        _require(
            x1.dtype in (torch.int8, *_FP_DTYPES), "C1", f"x1 dtype {x1.dtype} not int8/fp16/bf16"
        )
        _require(x1.dim() in (2, 3), "C1", f"x1 must be 2-D or 3-D, got shape {tuple(x1.shape)}")
        _require(x1.numel() > 0, "C12", "x1 must not be empty")
        _require(
            x1.is_contiguous(), "C1", "x1 must be contiguous (a transposed x1 is not supported)"
        )
        _require(self._formats.get(x1) == FORMAT_ND, "C1", "x1 must be in ND format")
        _require(
            x2.dtype in (torch.int8, *_FP_DTYPES), "C2", f"x2 dtype {x2.dtype} not int8/fp16/bf16"
        )
        _require(x2.dim() == 2, "C2", f"x2 must be 2-D (k, n), got shape {tuple(x2.shape)}")
        _require(x2.numel() > 0, "C12", "x2 must not be empty")
        x2_transposed = not x2.is_contiguous()
        _require(
            x2.is_contiguous() or x2.t().is_contiguous(),
            "C2",
            "x2 must be contiguous (k, n) or the transpose of a contiguous (n, k) tensor",
        )
        k = x1.shape[-1]
        m = _numel_prod(tuple(x1.shape[:-1]))
        _require(x2.shape[0] == k, "C3", f"x2.shape[0]={x2.shape[0]} must equal x1.shape[-1]={k}")
        n = x2.shape[1]
        x2_nz = self._formats.get(x2) == FORMAT_FRACTAL_NZ
        for name, t in (
            ("bias", bias), ("antiquant_scale", antiquant_scale),
            ("antiquant_offset", antiquant_offset), ("x3", x3), ("dequant_scale", dequant_scale),
            ("pertoken_scale", pertoken_scale), ("comm_quant_scale_1", comm_quant_scale_1),
            ("comm_quant_scale_2", comm_quant_scale_2),
        ):  # fmt: skip
            if t is None:
                continue
            _require(isinstance(t, torch.Tensor), "C6", f"{name} must be a Tensor or None")
            _require(self._formats.get(t) == FORMAT_ND, "C6", f"{name} must be in ND format")
            _require(t.device == x1.device, "C6", f"{name} is on {t.device}, x1 on {x1.device}")
        _require(x2.device == x1.device, "C2", f"x2 is on {x2.device}, x1 on {x1.device}")

        # ---- scenario
        if x1.dtype in _FP_DTYPES and x2.dtype == x1.dtype:
            scenario = "FP"
        elif x1.dtype in _FP_DTYPES and x2.dtype == torch.int8:
            scenario = "W8A16"
        elif x1.dtype == torch.int8 and x2.dtype == torch.int8:
            scenario = "W8A8"
        else:
            _fail("C2", f"x1 {x1.dtype} with x2 {x2.dtype} matches no dtype table (1-3)")
            raise AssertionError  # unreachable

        if scenario != "W8A8":
            _require(
                comm_quant_scale_1 is None and comm_quant_scale_2 is None,
                "Q8",
                "comm_quant_scale_1/2 are supported in the full-quant (W8A8) scenario only",
            )
        if scenario != "W8A16":
            _require(
                antiquant_scale is None and antiquant_offset is None,
                "Q1",
                f"antiquant_scale/offset must be None in the {scenario} scenario",
            )
            _require(
                antiquant_group_size == 0,
                "Q3",
                f"antiquant_group_size must be 0 in the {scenario} scenario",
            )
        if scenario != "W8A8":
            _require(
                dequant_scale is None and pertoken_scale is None,
                "Q5",
                f"dequant_scale/pertoken_scale must be None in the {scenario} scenario",
            )

        if scenario == "FP":
            out_dtype = x1.dtype
            _require(
                not x2_nz,
                "C2",
                "x2 in FRACTAL_NZ is rejected in the non-quant scenario on Atlas A2 "
                "(KERNELS.md: 'non-quant B matrix does not support NZ except on 310P')",
            )
            _require(
                m <= _INT32_MAX and k <= _INT32_MAX and n <= _INT32_MAX,
                "C13",
                "FP: m, k, n must be in [1, 2^31-1]",
            )
            bias_dtype = x1.dtype
        elif scenario == "W8A16":
            out_dtype = x1.dtype
            bias_dtype = x1.dtype
            _require(m <= _INT32_MAX, "Q4", "W8A16: m must be in [1, 2^31-1]")
            _require(
                k <= _QUANT_DIM_MAX and n <= _QUANT_DIM_MAX,
                "Q4",
                f"W8A16: k={k} and n={n} must be in [1, 65535]",
            )
            self._check_antiquant(x1.dtype, k, n, antiquant_scale, antiquant_offset,
                                  antiquant_group_size)  # fmt: skip
        else:
            bias_dtype = torch.int32
            _require(m <= _INT32_MAX, "Q7", "W8A8: m must be in [1, 2^31-1]")
            _require(k <= _QUANT_DIM_MAX, "Q7", f"W8A8: k={k} must be in [1, 65535]")
            _require(
                n <= _QUANT_DIM_MAX or x2_transposed,
                "Q7",
                f"W8A8: n={n} > 65535 is allowed only when x2 is the transpose of an (n, k) tensor",
            )
            out_dtype = self._check_dequant(m, n, dequant_scale, pertoken_scale, x1)
            _require(
                (comm_quant_scale_1 is None) == (comm_quant_scale_2 is None),
                "Q8",
                "comm_quant_scale_1 and comm_quant_scale_2 must be given together (or neither)",
            )
            if comm_quant_scale_1 is not None and comm_quant_scale_2 is not None:
                for name, s in (("comm_quant_scale_1", comm_quant_scale_1),
                                ("comm_quant_scale_2", comm_quant_scale_2)):  # fmt: skip
                    _require(
                        s.dtype == out_dtype,
                        "Q8",
                        f"{name} dtype {s.dtype} must equal the output dtype {out_dtype}",
                    )
                    _require(
                        tuple(s.shape) in ((n,), (1, n)),
                        "Q8",
                        f"{name} shape {tuple(s.shape)} must be [n] or [1, n] with n={n}",
                    )
                _require(
                    comm_quant_scale_1.shape == comm_quant_scale_2.shape,
                    "Q8",
                    "comm_quant_scale_1 and comm_quant_scale_2 must have the same shape",
                )

        out_shape = (*x1.shape[:-1], n)
        if bias is not None:
            _require(
                bias.dim() == 1 and bias.shape[0] == n,
                "C6",
                f"bias must be 1-D of length n={n}, got shape {tuple(bias.shape)}",
            )
            _require(
                bias.dtype == bias_dtype,
                "C6",
                f"{scenario}: bias dtype {bias.dtype} must be {bias_dtype} (dtype tables)",
            )
        if x3 is not None:
            _require(
                tuple(x3.shape) == out_shape and x3.dtype == out_dtype,
                "C7",
                f"x3 must have the output's shape {out_shape} and dtype {out_dtype}, got "
                f"{tuple(x3.shape)} {x3.dtype}",
            )

        group, world = self._resolve_hcom(hcom)
        _require(world in _WORLD_SIZES, "C12", f"world size {world} not in {_WORLD_SIZES}")

        # ---- compute the per-rank value
        x1_2d = x1.reshape(m, k)
        if scenario == "FP":
            v = x1_2d.double() @ x2.double()
            if bias is not None:
                v = v + bias.double()
        elif scenario == "W8A16":
            assert antiquant_scale is not None
            w = _antiquant_weight(x2, antiquant_scale, antiquant_offset, antiquant_group_size,
                                  x1.dtype)  # fmt: skip
            v = x1_2d.double() @ w.double()
            if bias is not None:
                v = v + bias.double()
        else:
            assert dequant_scale is not None
            acc = _int_matmul(x1_2d, x2)
            if bias is not None:
                acc = _wrap_int32(acc + bias.to(torch.int64))
            scale = self._effective_dequant(dequant_scale).reshape(-1)
            v = acc.double() * scale.double()
            if pertoken_scale is not None:
                v = v * pertoken_scale.double().reshape(m, 1)
        if x3 is not None:
            v = v + x3.reshape(m, n).double()
        per_rank = v.to(out_dtype)

        # ---- communicate
        if comm_quant_scale_1 is not None and comm_quant_scale_2 is not None:
            out = self._comm_quant_all_reduce(
                per_rank, comm_quant_scale_1, comm_quant_scale_2, group, out_dtype
            )
        elif group is None:
            out = per_rank
        else:
            buf = per_rank.float()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            out = buf.to(out_dtype)
        return out.reshape(out_shape)

    def _check_antiquant(
        self,
        x_dtype: torch.dtype,
        k: int,
        n: int,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        group_size: int,
    ) -> None:
        _require(scale is not None, "Q1", "W8A16: antiquant_scale is required")
        assert scale is not None
        _require(
            scale.dtype == x_dtype,
            "Q1",
            f"antiquant_scale dtype {scale.dtype} must equal x1's {x_dtype}",
        )
        _require(
            isinstance(group_size, int) and group_size >= 0,
            "Q3",
            f"antiquant_group_size must be a non-negative int, got {group_size!r}",
        )
        shape = tuple(scale.shape)
        if group_size == 0:
            _require(
                shape in ((1,), (n,), (1, n)),
                "Q1",
                f"antiquant_scale shape {shape}: per-tensor [1] or per-channel [n]/[1, n] "
                f"(n={n}) when antiquant_group_size is 0",
            )
        else:
            _require(
                group_size % 32 == 0 and 32 <= group_size <= k - 1,
                "Q3",
                f"antiquant_group_size={group_size} must be a multiple of 32 in [32, k-1={k - 1}]",
            )
            groups = (k + group_size - 1) // group_size
            _require(
                shape == (groups, n),
                "Q1",
                f"per-group antiquant_scale shape {shape} must be [ceil(k/g), n] = [{groups}, {n}]",
            )
        if offset is not None:
            _require(
                offset.dtype == scale.dtype and offset.shape == scale.shape,
                "Q2",
                f"antiquant_offset ({tuple(offset.shape)}, {offset.dtype}) must match "
                f"antiquant_scale ({shape}, {scale.dtype})",
            )

    def _check_dequant(
        self,
        m: int,
        n: int,
        dequant_scale: torch.Tensor | None,
        pertoken_scale: torch.Tensor | None,
        x1: torch.Tensor,
    ) -> torch.dtype:
        """Validate W8A8 scales (Q5, Q6, Q9, table 3); return the output dtype."""
        _require(dequant_scale is not None, "Q5", "W8A8: dequant_scale is required")
        assert dequant_scale is not None
        ds = dequant_scale.dtype
        _require(
            ds in (torch.int64, torch.uint64, torch.bfloat16, torch.float32),
            "Q5",
            f"dequant_scale dtype {ds} not int64/uint64/bfloat16/float32",
        )
        _require(
            tuple(dequant_scale.shape) in ((1,), (n,), (1, n)),
            "Q5",
            f"dequant_scale shape {tuple(dequant_scale.shape)} must be [1], [n] or [1, n] (n={n})",
        )
        if pertoken_scale is not None:
            _require(
                pertoken_scale.dtype == torch.float32,
                "Q6",
                f"pertoken_scale dtype {pertoken_scale.dtype} must be float32",
            )
            want = "[b*s]" if x1.dim() == 3 else "[m]"
            _require(
                tuple(pertoken_scale.shape) == (m,),
                "Q6",
                f"pertoken_scale shape {tuple(pertoken_scale.shape)} must be {want} = [{m}]",
            )
        if ds in (torch.int64, torch.uint64):
            _require(
                pertoken_scale is None,
                "Q5",
                "int64/uint64 dequant_scale has no pertoken_scale row in table 3",
            )
            _decode_packed_scale(dequant_scale, "Q5")
            return torch.float16
        if ds == torch.float32:
            _require(
                pertoken_scale is not None,
                "Q9",
                "float32 dequant_scale without pertoken_scale must first be packed to int64 "
                "with npu_trans_quant_param",
            )
            return torch.float16
        return torch.bfloat16

    @staticmethod
    def _effective_dequant(dequant_scale: torch.Tensor) -> torch.Tensor:
        if dequant_scale.dtype in (torch.int64, torch.uint64):
            return _decode_packed_scale(dequant_scale, "Q5")[0]
        return dequant_scale.to(torch.float32)

    @staticmethod
    def _comm_quant_all_reduce(
        per_rank: torch.Tensor,
        s1: torch.Tensor,
        s2: torch.Tensor,
        group: dist.ProcessGroup | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """KERNELS.md steps 2-4. The row split of the reduce-scatter/all-gather does not change
        any element's value, so it is modeled as an all-reduce of the int8 codes (exact in
        float32) followed by the requant and dequant applied to every row."""
        s1f = s1.float().reshape(1, -1)
        s2f = s2.float().reshape(1, -1)
        a = _rint_saturate(per_rank.float() / s1f, torch.int8)
        summed = a.float()
        if group is not None:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        r = _rint_saturate(summed * (s1f / s2f), torch.int8)
        return (r.float() * s2f).to(out_dtype)

    # ---------------------------------------------------------------- sequence-parallel ops

    def npu_all_gather_base_mm(
        self,
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
        """``output = allgather(x1) @ x2`` (quantized: ``(allgather(x1_scale) * x2_scale) *
        (allgather(x1) @ x2)``), ``gather_out = allgather(x1)`` or an empty (0,) tensor.

        input (m, k) per rank; output (m * world_size, n); doc: op-plugin
        docs/context/torch_npu-npu_all_gather_base_mm.md.
        """
        args = dict(input=input, x2=x2, hcom=hcom, world_size=world_size, bias=bias,
                    x1_scale=x1_scale, x2_scale=x2_scale, gather_index=gather_index,
                    gather_output=gather_output, comm_turn=comm_turn,
                    output_dtype=output_dtype, comm_mode=comm_mode)  # fmt: skip
        return self._run("npu_all_gather_base_mm", args, lambda: self._all_gather_mm(**args))

    def npu_mm_reduce_scatter_base(
        self,
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
        """``output = reducescatter(x1 @ x2)`` (quantized: ``(x1_scale * x2_scale) * (x1 @
        x2)`` per rank); input (m, k), m divisible by world_size; output (m / world_size, n).
        Doc: op-plugin docs/context/torch_npu-npu_mm_reduce_scatter_base.md."""
        args = dict(input=input, x2=x2, hcom=hcom, world_size=world_size, reduce_op=reduce_op,
                    bias=bias, x1_scale=x1_scale, x2_scale=x2_scale, comm_turn=comm_turn,
                    output_dtype=output_dtype, comm_mode=comm_mode)  # fmt: skip
        return self._run(
            "npu_mm_reduce_scatter_base", args, lambda: self._mm_reduce_scatter(**args)
        )

    def _check_sp(
        self,
        op: str,
        x1: torch.Tensor,
        x2: torch.Tensor,
        hcom: str,
        world_size: int,
        bias: torch.Tensor | None,
        x1_scale: torch.Tensor | None,
        x2_scale: torch.Tensor | None,
        comm_turn: int,
        output_dtype: torch.dtype | None,
        comm_mode: str | None,
    ) -> tuple[dist.ProcessGroup | None, torch.dtype]:
        """The two docs' shared constraints; returns (group, output dtype)."""
        _require(
            isinstance(x1, torch.Tensor) and isinstance(x2, torch.Tensor), op, "x1/x2: Tensors"
        )
        _require(
            x1.dtype in (torch.int8, *_FP_DTYPES) and x2.dtype == x1.dtype,
            op,
            f"x1 {x1.dtype} / x2 {x2.dtype}: fp16, bf16 or int8, the same for both",
        )
        _require(x1.dim() == 2 and x2.dim() == 2, op, "x1 (m, k) and x2 (k, n) must be 2-D")
        _require(x1.numel() > 0 and x2.numel() > 0, op, "x1/x2 must not be empty")
        _require(x1.is_contiguous(), op, "x1 must be contiguous")
        _require(self._formats.get(x1) == FORMAT_ND, op, "x1 must be in ND format")
        k = x1.shape[1]
        _require(x2.shape[0] == k, op, f"x2.shape[0]={x2.shape[0]} must equal k={k}")
        _require(256 <= k < _QUANT_DIM_MAX, op, f"k={k} must be in [256, 65535)")
        _require(bias is None, op, "bias: only None is supported")
        _require(comm_turn == 0, op, f"comm_turn must be 0, got {comm_turn!r}")
        _require(
            comm_mode in (None, "ai_cpu", "aiv"),
            op,
            f"comm_mode {comm_mode!r} not None/'ai_cpu'/'aiv'",
        )
        if self._formats.get(x2) == FORMAT_FRACTAL_NZ:
            _require(comm_mode == "aiv", op, "an NZ x2 needs comm_mode='aiv'")
        out_dtype = self._sp_out_dtype(op, x1, x2, x1_scale, x2_scale, output_dtype, comm_mode)
        group, world = self._resolve_hcom(hcom)
        _require(
            world_size == world and world in (2, 4, 8),
            op,
            f"world_size={world_size!r} must be the domain's size {world} (2, 4 or 8)",
        )
        return group, out_dtype

    @staticmethod
    def _sp_out_dtype(
        op: str,
        x1: torch.Tensor,
        x2: torch.Tensor,
        x1_scale: torch.Tensor | None,
        x2_scale: torch.Tensor | None,
        output_dtype: torch.dtype | None,
        comm_mode: str | None,
    ) -> torch.dtype:
        """The scenario's scale / output-dtype constraints; returns the output dtype."""
        n = x2.shape[1]
        if x1.dtype != torch.int8:
            _require(x1_scale is None and x2_scale is None, op, "x1_scale/x2_scale: quantized only")
            _require(output_dtype in (None, x1.dtype), op, f"output_dtype {output_dtype}")
            return x1.dtype
        _require(comm_mode == "aiv", op, "the quantized scenario needs comm_mode='aiv'")
        _require(x2_scale is not None, op, "x2_scale is required in the quantized scenario")
        assert x2_scale is not None
        _require(
            x2_scale.dtype in (torch.float32, torch.int64) and tuple(x2_scale.shape) == (1, n),
            op,
            f"x2_scale must be float32 or int64 (1, n={n}), got {x2_scale.dtype} "
            f"{tuple(x2_scale.shape)}",
        )
        if x1_scale is not None:
            _require(
                x1_scale.dtype == torch.float32 and tuple(x1_scale.shape) == (x1.shape[0], 1),
                op,
                f"x1_scale must be float32 (m, 1), got {x1_scale.dtype} {tuple(x1_scale.shape)}",
            )
        if x2_scale.dtype == torch.int64:
            _require(output_dtype in (None, torch.float16), op, "int64 x2_scale: float16 output")
            return torch.float16
        _require(
            output_dtype in (None, torch.float16, torch.bfloat16),
            op,
            f"output_dtype {output_dtype} not float16/bfloat16",
        )
        return output_dtype or torch.bfloat16

    def _sp_matmul(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        x1_scale: torch.Tensor | None,
        x2_scale: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """One rank's matmul rounded once to ``out_dtype``: float64 (FP), or exact int
        accumulation dequantized as npu_quant_matmul does (a float32 scale without per-token
        scale and fp16 output keeps the 19 bits the packing keeps)."""
        if x2_scale is None:
            return (x1.double() @ x2.double()).to(out_dtype)
        if x2_scale.dtype == torch.int64:
            scale = _decode_packed_scale(x2_scale, "sp")[0]
        elif out_dtype == torch.float16 and x1_scale is None:
            scale = _truncate_f32_scale(x2_scale)
        else:
            scale = x2_scale.float()
        v = _int_matmul(x1, x2).double() * scale.double().reshape(1, -1)
        if x1_scale is not None:
            v = v * x1_scale.double().reshape(-1, 1)
        return v.to(out_dtype)

    def _all_gather_mm(
        self,
        input: torch.Tensor,
        x2: torch.Tensor,
        hcom: str,
        world_size: int,
        bias: torch.Tensor | None,
        x1_scale: torch.Tensor | None,
        x2_scale: torch.Tensor | None,
        gather_index: int,
        gather_output: bool,
        comm_turn: int,
        output_dtype: torch.dtype | None,
        comm_mode: str | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        op = "all_gather_base_mm"
        group, out_dtype = self._check_sp(op, input, x2, hcom, world_size, bias, x1_scale,
                                          x2_scale, comm_turn, output_dtype, comm_mode)  # fmt: skip
        _require(gather_index == 0, op, f"gather_index must be 0, got {gather_index!r}")
        _require(isinstance(gather_output, bool), op, "gather_output must be a bool")

        def gather(t: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(world_size)]
            dist.all_gather(parts, t.contiguous(), group=group)
            return torch.cat(parts)

        gathered = gather(input)
        scales = None if x1_scale is None else gather(x1_scale)
        out = self._sp_matmul(gathered, x2, scales, x2_scale, out_dtype)
        return out, gathered if gather_output else input.new_empty((0,))

    def _mm_reduce_scatter(
        self,
        input: torch.Tensor,
        x2: torch.Tensor,
        hcom: str,
        world_size: int,
        reduce_op: str,
        bias: torch.Tensor | None,
        x1_scale: torch.Tensor | None,
        x2_scale: torch.Tensor | None,
        comm_turn: int,
        output_dtype: torch.dtype | None,
        comm_mode: str | None,
    ) -> torch.Tensor:
        op = "mm_reduce_scatter_base"
        group, out_dtype = self._check_sp(op, input, x2, hcom, world_size, bias, x1_scale,
                                          x2_scale, comm_turn, output_dtype, comm_mode)  # fmt: skip
        _require(reduce_op == "sum", op, f"reduce_op must be 'sum', got {reduce_op!r}")
        m = input.shape[0]
        _require(m % world_size == 0, op, f"m={m} must be divisible by world_size={world_size}")
        # the per-rank value rounded to the output dtype, summed in float32 (as the fused
        # all-reduce above), this rank's block of rows kept
        buf = self._sp_matmul(input, x2, x1_scale, x2_scale, out_dtype).float()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        rows = m // world_size
        r = dist.get_rank(group)
        return buf[r * rows : (r + 1) * rows].to(out_dtype)

    # ---------------------------------------------------------------- helper kernels

    def npu_trans_quant_param(
        self, scale: torch.Tensor, offset: torch.Tensor | None = None, round_mode: int = 0
    ) -> torch.Tensor:
        """Pack float32 ``scale`` (and ``offset``) into int64 (KERNELS.md bit layout).

        ``(f32_bits(scale) & 0xFFFFE000) | 1 << 46 | (clamp(rint(offset), -256, 255) & 0x1FF) << 37``.
        ``round_mode=1`` rounds the 13 dropped mantissa bits to nearest-even instead.
        """
        return self._run(
            "npu_trans_quant_param",
            {"scale": scale, "offset": offset, "round_mode": round_mode},
            lambda: self._trans_quant_param(scale, offset, round_mode),
        )

    @staticmethod
    def _trans_quant_param(
        scale: torch.Tensor, offset: torch.Tensor | None, round_mode: int
    ) -> torch.Tensor:
        rule = "trans_quant_param"
        _require(scale.dtype == torch.float32, rule, f"scale dtype {scale.dtype} must be float32")
        _require(scale.dim() in (1, 2) and scale.numel() > 0, rule, "scale must be 1-D or 2-D")
        _require(round_mode in (0, 1), rule, f"round_mode must be 0 or 1, got {round_mode!r}")
        if offset is not None:
            _require(
                offset.dtype == torch.float32, rule, f"offset dtype {offset.dtype} must be float32"
            )
            if scale.dim() == 1:
                _require(
                    offset.dim() == 1
                    and (
                        offset.shape[0] == scale.shape[0] or 1 in (offset.shape[0], scale.shape[0])
                    ),
                    rule,
                    f"1-D scale {tuple(scale.shape)} and offset {tuple(offset.shape)} do not broadcast",
                )
                length = max(scale.shape[0], offset.shape[0])
                scale = scale.expand(length)
                offset = offset.expand(length)
            else:
                _require(
                    offset.shape == scale.shape and scale.shape[0] == 1,
                    rule,
                    f"2-D scale/offset must both be (1, n), got {tuple(scale.shape)} / "
                    f"{tuple(offset.shape)}",
                )
        bits = _f32_bits(scale)
        if round_mode == 1:
            lsb = (bits >> 13) & 1
            bits = bits + 0xFFF + lsb
        packed = (bits & 0xFFFFE000) | (1 << 46)
        if offset is not None:
            off = torch.round(offset).clamp(-256, 255).to(torch.int64) & 0x1FF
            packed = packed | (off << 37)
        return packed

    def npu_quantize(
        self,
        input: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor | None,
        dtype: torch.dtype,
        axis: int = 1,
        div_mode: bool = True,
    ) -> torch.Tensor:
        """``rint(input / scales + zero_points)`` (``div_mode=False``: ``* scales``), saturated.

        ``dtype``: ``torch.qint8`` -> int8 output, ``torch.quint8`` -> uint8, ``torch.int32``.
        Computed in float32; same shape as ``input``.
        """
        args = dict(input=input, scales=scales, zero_points=zero_points, dtype=dtype, axis=axis,
                    div_mode=div_mode)  # fmt: skip
        return self._run("npu_quantize", args, lambda: self._quantize(**args))

    @staticmethod
    def _quantize(
        input: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor | None,
        dtype: torch.dtype,
        axis: int,
        div_mode: bool,
    ) -> torch.Tensor:
        rule = "quantize"
        _require(
            input.dtype in (torch.float32, torch.float16, torch.bfloat16),
            rule,
            f"input dtype {input.dtype} not float32/float16/bfloat16",
        )
        out_map = {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.int32: torch.int32}
        if dtype == torch.quint4x2:
            raise DoubleUnsupportedError("npu_quantize to quint4x2 is not modeled by the double")
        _require(dtype in out_map, rule, f"dtype {dtype} not qint8/quint8/int32")
        if div_mode:
            _require(
                scales.dtype in (torch.float32, torch.bfloat16),
                rule,
                f"div_mode=True: scales dtype {scales.dtype} not float32/bfloat16",
            )
            if zero_points is not None:
                _require(
                    zero_points.dtype in (torch.int8, torch.uint8, torch.int32, torch.bfloat16),
                    rule,
                    f"div_mode=True: zero_points dtype {zero_points.dtype} not int8/uint8/int32/bf16",
                )
            ax = axis if axis >= 0 else axis + input.dim()
            _require(0 <= ax < input.dim(), rule, f"axis {axis} out of range for {input.dim()}-D")
        else:
            _require(
                dtype == torch.qint8, rule, "div_mode=False supports dtype qint8 (or quint4x2) only"
            )
            _require(
                scales.dtype in (torch.float32, torch.float16, torch.bfloat16),
                rule,
                f"div_mode=False: scales dtype {scales.dtype} not float32/float16/bfloat16",
            )
            _require(axis >= -2 and axis < input.dim(), rule, f"div_mode=False: axis {axis} < -2")
            ax = input.dim() - 2 if axis == -2 else input.dim() - 1
            if zero_points is not None:
                _require(
                    zero_points.dtype == scales.dtype and zero_points.shape == scales.shape,
                    rule,
                    "div_mode=False: zero_points must match scales' shape and dtype",
                )
        size = input.shape[ax]
        bshape = [1] * input.dim()
        bshape[ax] = -1

        def _prep(t: torch.Tensor, what: str) -> torch.Tensor:
            if t.dim() <= 1:
                _require(
                    t.numel() in (1, size),
                    rule,
                    f"{what} of {t.numel()} elements: must be 1 or input.shape[{ax}]={size}",
                )
                return t.float().reshape(bshape) if t.numel() == size else t.float().reshape(1)
            want = [1] * input.dim()
            want[ax] = size
            _require(
                t.dim() == input.dim()
                and all(d == 1 or (i == ax and d == size) for i, d in enumerate(t.shape)),
                rule,
                f"{what} shape {tuple(t.shape)} must be 1-D or {tuple(want)}",
            )
            return t.float()

        s = _prep(scales, "scales")
        y = input.float() / s if div_mode else input.float() * s
        if zero_points is not None:
            y = y + _prep(zero_points, "zero_points")
        return _rint_saturate(y, out_map[dtype])

    def npu_dynamic_quant(
        self,
        input: torch.Tensor,
        *,
        smooth_scales: torch.Tensor | None = None,
        group_index: torch.Tensor | None = None,
        dst_type: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token symmetric int8 quant of fp16/bf16 ``input`` (dim > 1).

        Returns ``(y int8 same shape, scale float32 of shape input.shape[:-1])`` with
        ``inv = 127 / rowmax(|x * smooth|)``, ``y = rint(x * inv)``, ``scale = 1 / inv``; a zero
        row gets scale 1. Computed in float32.
        """
        args = dict(input=input, smooth_scales=smooth_scales, group_index=group_index,
                    dst_type=dst_type)  # fmt: skip
        return self._run("npu_dynamic_quant", args, lambda: self._dynamic_quant(**args))

    @staticmethod
    def _dynamic_quant(
        input: torch.Tensor,
        smooth_scales: torch.Tensor | None,
        group_index: torch.Tensor | None,
        dst_type: torch.dtype | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rule = "dynamic_quant"
        _require(input.dtype in _FP_DTYPES, rule, f"input dtype {input.dtype} not fp16/bf16")
        _require(input.dim() > 1, rule, "input must have more than 1 dim")
        if group_index is not None:
            raise DoubleUnsupportedError("npu_dynamic_quant group_index (MoE) is not modeled")
        if dst_type == torch.quint4x2:
            raise DoubleUnsupportedError("npu_dynamic_quant to quint4x2 is not modeled")
        _require(dst_type in (None, torch.int8), rule, f"dst_type {dst_type} not int8/None")
        x = input.float()
        if smooth_scales is not None:
            _require(
                smooth_scales.dtype in _FP_DTYPES,
                rule,
                f"smooth_scales dtype {smooth_scales.dtype} not fp16/bf16",
            )
            _require(
                tuple(smooth_scales.shape) == (input.shape[-1],),
                rule,
                f"smooth_scales shape {tuple(smooth_scales.shape)} must be ({input.shape[-1]},)",
            )
            x = x * smooth_scales.float()
        rowmax = x.abs().amax(dim=-1, keepdim=True)
        inv = torch.where(rowmax > 0, 127.0 / rowmax, torch.ones_like(rowmax))
        y = _rint_saturate(x * inv, torch.int8)
        scale = (1.0 / inv).squeeze(-1)
        return y, scale

    def npu_quant_matmul(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        scale: torch.Tensor,
        *,
        offset: torch.Tensor | None = None,
        pertoken_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        output_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """int8 ``x1 (.., m, k) @ x2 (.., k, n)`` with dequant (op-plugin table 2, Atlas A2).

        ``(x1 @ x2 + bias_int32) * scale [* pertoken] [+ bias_float] [+ offset]``; output dtype
        ``output_dtype`` (None -> int8). A float32 scale with fp16/int8 output and no pertoken is
        truncated to 19 bits (packed internally). int32 output is not modeled.
        """
        args = dict(x1=x1, x2=x2, scale=scale, offset=offset, pertoken_scale=pertoken_scale,
                    bias=bias, output_dtype=output_dtype)  # fmt: skip
        return self._run("npu_quant_matmul", args, lambda: self._quant_matmul(**args))

    def _quant_matmul(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor | None,
        pertoken_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        output_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        rule = "quant_matmul"
        if x1.dtype == torch.int32 or x2.dtype == torch.int32:
            raise DoubleUnsupportedError("npu_quant_matmul int4-in-int32 is not modeled")
        _require(
            x1.dtype == torch.int8 and x2.dtype == torch.int8,
            rule,
            f"x1/x2 must be int8, got {x1.dtype}/{x2.dtype}",
        )
        _require(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, rule, "x1/x2 must be 2-6 D")
        _require(x1.numel() > 0 and x2.numel() > 0, rule, "x1/x2 must not be empty")
        _require(self._formats.get(x1) == FORMAT_ND, rule, "x1 must be in ND format")
        k, n, m = x1.shape[-1], x2.shape[-1], x1.shape[-2]
        _require(x2.shape[-2] == k, rule, f"x2 k {x2.shape[-2]} != x1 k {k}")
        _require(
            k <= _QUANT_DIM_MAX and n <= _QUANT_DIM_MAX,
            rule,
            f"last dims of x1 (k={k}) and x2 (n={n}) must not exceed 65535",
        )
        out = output_dtype if output_dtype is not None else torch.int8
        if out == torch.int32:
            raise DoubleUnsupportedError("npu_quant_matmul int32 output is not modeled")
        _require(
            out in (torch.int8, torch.float16, torch.bfloat16),
            rule,
            f"output_dtype {output_dtype} not int8/float16/bfloat16/int32",
        )
        _require(
            scale.dim() == 1 and scale.shape[0] in (1, n),
            rule,
            f"scale shape {tuple(scale.shape)} must be (1,) or (n,)=({n},)",
        )
        sd = scale.dtype
        _require(
            sd in (torch.int64, torch.float32, torch.bfloat16),
            rule,
            f"scale dtype {sd} not float32/int64/bfloat16",
        )
        if offset is not None:
            _require(
                offset.dtype == torch.float32 and offset.dim() == 1 and offset.shape[0] in (1, n),
                rule,
                "offset must be float32 of shape (1,) or (n,)",
            )
        if pertoken_scale is not None:
            _require(
                pertoken_scale.dtype == torch.float32 and tuple(pertoken_scale.shape) == (m,),
                rule,
                f"pertoken_scale must be float32 of shape (m,)=({m},)",
            )
        bd = bias.dtype if bias is not None else None
        # op-plugin table 2 (int8 rows)
        if out == torch.float16 and pertoken_scale is None:
            ok = sd in (torch.int64, torch.float32) and offset is None and bd in (torch.int32, None)
        elif out == torch.int8:
            ok = sd in (torch.int64, torch.float32) and pertoken_scale is None and bd in (
                torch.int32, None)  # fmt: skip
        elif out == torch.bfloat16:
            ok = sd in (torch.float32, torch.bfloat16) and offset is None and bd in (
                torch.int32, torch.bfloat16, torch.float32, None)  # fmt: skip
        else:  # fp16 with pertoken
            ok = sd == torch.float32 and offset is None and bd in (
                torch.int32, torch.bfloat16, torch.float32, None)  # fmt: skip
        _require(
            ok,
            rule,
            f"combination scale={sd}, offset={None if offset is None else offset.dtype}, "
            f"bias={bd}, pertoken={'yes' if pertoken_scale is not None else 'no'}, "
            f"output={out} is not in the dtype table",
        )
        if bias is not None:
            out_dim = max(x1.dim(), x2.dim())
            ok_shape = tuple(bias.shape) == (n,) or (
                out_dim == 3 and bias.dim() == 3 and bias.shape[1] == 1 and bias.shape[2] == n
            )
            _require(ok_shape, rule, f"bias shape {tuple(bias.shape)} must be (n,) or (b, 1, n)")

        acc = _int_matmul(x1, x2)
        if bias is not None and bias.dtype == torch.int32:
            acc = _wrap_int32(acc + bias.to(torch.int64))
        off_eff: torch.Tensor | None = offset.float() if offset is not None else None
        if sd == torch.int64:
            s_eff, packed_off = _decode_packed_scale(scale, rule)
            if out == torch.int8 and off_eff is None:
                off_eff = packed_off
        elif sd == torch.float32 and out in (torch.float16, torch.int8) and pertoken_scale is None:
            s_eff = _truncate_f32_scale(scale)
        else:
            s_eff = scale.float()
        v = acc.double() * s_eff.double()
        if pertoken_scale is not None:
            v = v * pertoken_scale.double().unsqueeze(-1)
        if bias is not None and bias.dtype != torch.int32:
            v = v + bias.double()
        if out == torch.int8:
            if off_eff is not None:
                v = v + off_eff.double()
            return _rint_saturate(v, torch.int8)
        return v.to(out)

    def npu_weight_quant_batchmatmul(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        antiquant_scale: torch.Tensor,
        antiquant_offset: torch.Tensor | None = None,
        quant_scale: torch.Tensor | None = None,
        quant_offset: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        antiquant_group_size: int = 0,
        inner_precise: int = 0,
    ) -> torch.Tensor:
        """``x (m, k) @ ((weight (k, n) int8 + offset) * scale) + bias`` -> x's dtype.

        The dequantized weight is rounded to x's dtype after ``+ offset`` and again after
        ``* scale`` (vendor golden); matmul in float64. Weight may be ND or NZ. ``quant_scale``
        (int8 output) is not modeled.
        """
        args = dict(x=x, weight=weight, antiquant_scale=antiquant_scale,
                    antiquant_offset=antiquant_offset, quant_scale=quant_scale,
                    quant_offset=quant_offset, bias=bias,
                    antiquant_group_size=antiquant_group_size, inner_precise=inner_precise)  # fmt: skip
        return self._run(
            "npu_weight_quant_batchmatmul", args, lambda: self._weight_quant_bmm(**args)
        )

    def _weight_quant_bmm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        antiquant_scale: torch.Tensor,
        antiquant_offset: torch.Tensor | None,
        quant_scale: torch.Tensor | None,
        quant_offset: torch.Tensor | None,
        bias: torch.Tensor | None,
        antiquant_group_size: int,
        inner_precise: int,
    ) -> torch.Tensor:
        rule = "weight_quant_batchmatmul"
        if quant_scale is not None or quant_offset is not None:
            raise DoubleUnsupportedError("npu_weight_quant_batchmatmul quant_scale is not modeled")
        if weight.dtype == torch.int32:
            raise DoubleUnsupportedError("npu_weight_quant_batchmatmul int4 weight is not modeled")
        if antiquant_scale.dtype == torch.int64:
            raise DoubleUnsupportedError("npu_weight_quant_batchmatmul int64 scale is not modeled")
        _require(x.dtype in _FP_DTYPES, rule, f"x dtype {x.dtype} not fp16/bf16")
        _require(x.dim() == 2 and weight.dim() == 2, rule, "x (m, k) and weight (k, n) must be 2-D")
        _require(x.numel() > 0 and weight.numel() > 0, rule, "x/weight must not be empty")
        _require(weight.dtype == torch.int8, rule, f"weight dtype {weight.dtype} not int8")
        _require(self._formats.get(x) == FORMAT_ND, rule, "x must be in ND format")
        _require(inner_precise in (0, 1), rule, f"inner_precise {inner_precise!r} not 0/1")
        k, n = x.shape[1], weight.shape[1]
        _require(weight.shape[0] == k, rule, f"weight k {weight.shape[0]} != x k {k}")
        _require(
            antiquant_scale.dtype == x.dtype,
            rule,
            f"antiquant_scale dtype {antiquant_scale.dtype} must equal x's {x.dtype}",
        )
        shape = tuple(antiquant_scale.shape)
        g = antiquant_group_size
        if g == 0:
            _require(
                shape in ((1,), (1, 1), (n,), (1, n)),
                rule,
                f"antiquant_scale shape {shape} must be [1]/[1, 1]/[n]/[1, n] (n={n})",
            )
        else:
            _require(
                isinstance(g, int) and g % 32 == 0 and 32 <= g <= k - 1,
                rule,
                f"antiquant_group_size={g} must be a multiple of 32 in [32, k-1={k - 1}]",
            )
            groups = (k + g - 1) // g
            _require(
                shape == (groups, n),
                rule,
                f"per-group antiquant_scale shape {shape} must be ({groups}, {n})",
            )
        if antiquant_offset is not None:
            _require(
                antiquant_offset.dtype == antiquant_scale.dtype
                and antiquant_offset.shape == antiquant_scale.shape,
                rule,
                "antiquant_offset must match antiquant_scale's dtype and shape",
            )
        if bias is not None:
            want = torch.float16 if x.dtype == torch.float16 else torch.float32
            _require(
                bias.dtype == want,
                rule,
                f"bias dtype {bias.dtype} must be {want} for x {x.dtype} (KERNELS.md)",
            )
            _require(
                tuple(bias.shape) in ((n,), (1, n)),
                rule,
                f"bias shape {tuple(bias.shape)} must be (n,) or (1, n)",
            )
        w = _antiquant_weight(weight, antiquant_scale, antiquant_offset, g, x.dtype)
        v = x.double() @ w.double()
        if bias is not None:
            v = v + bias.double().reshape(1, n)
        return v.to(x.dtype)


# --------------------------------------------------------------------------------------------
# math helpers shared by the kernels
# --------------------------------------------------------------------------------------------


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 matmul as int64 (float64 is exact: |sum| <= 2^14 * 65535 < 2^53)."""
    return torch.matmul(a.double(), b.double()).to(torch.int64)


def _wrap_int32(t: torch.Tensor) -> torch.Tensor:
    """int64 values wrapped to the int32 range (two's complement accumulator), kept int64."""
    return ((t + 2**31) % 2**32) - 2**31


def _antiquant_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(w + offset) * scale`` with per-tensor/channel/group broadcast; rounded to ``dtype``
    after the add and after the multiply (the vendor golden). ``w`` is ``(k, n)`` int8."""
    k = w.shape[0]

    def _expand(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        if group_size > 0:
            return t.repeat_interleave(group_size, dim=0)[:k]
        return t.reshape(1, -1) if t.numel() > 1 else t.reshape(1, 1)

    wf = w.float()
    if offset is not None:
        wf = (wf + _expand(offset)).to(dtype).float()
    else:
        wf = wf.to(dtype).float()
    return (wf * _expand(scale)).to(dtype)


def iter_tensor_args(rec: CallRecord) -> Iterator[tuple[str, TensorInfo]]:
    """(name, TensorInfo) pairs of a record's tensor arguments."""
    for k, v in rec.args.items():
        if isinstance(v, TensorInfo):
            yield k, v
