"""Quantization scheme configs: what a checkpoint holds for one linear layer.

Each scheme is a plain frozen dataclass (torchao style). Its ``tensor_specs(n, k, bias,
model_dtype)`` is the ONE place in the code base that knows the checkpoint tensor names, shapes
and dtypes of a quantized ``nn.Linear`` of weight shape ``(n, k)`` (out_features, in_features):
the layers package creates its parameters from it and validates checkpoints against it.

Checkpoint conventions (msmodelslim; evidence in the ``quant.checkpoint`` docstring):

=================  ==================================================================
scheme             tensors of a layer ``P`` (names are ``P + "." + suffix``)
=================  ==================================================================
FLOAT              ``weight`` [n, k] model dtype, ``bias`` [n] model dtype (if any)
W8A16              ``weight`` int8 [n, k]; ``weight_scale`` / ``weight_offset``
                   [n, 1] (per-channel) or [n, k / g] (per-group) model dtype;
                   ``bias`` [n] model dtype (if any)
W8A8 (static)      ``weight`` int8 [n, k]; ``input_scale`` / ``input_offset`` [1] model
                   dtype; ``deq_scale`` [n] int64 (float32 bits, fp16 models) or float32
                   (bf16 / fp32 models); ``quant_bias`` int32 [n] (always, folds bias and
                   the input offset); optional ``weight_scale`` / ``weight_offset`` [n, 1]
                   model dtype. No float ``bias``.
W8A8_DYNAMIC       ``weight`` int8 [n, k]; ``weight_scale`` / ``weight_offset`` [n, 1]
                   model dtype; ``bias`` [n] model dtype (if any)
=================  ==================================================================

Offsets follow msmodelslim: ``w ~ (q - offset) * scale``. The fused kernels use
``(q + offset) * scale``; convert with :func:`quant.convention.to_antiquant_offset`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ascend_ops import kernels
from ascend_ops.quant_param import trans_quant_param
from quant.algorithms import (
    ActivationRange,
    QuantizedWeight,
    activation_qparams,
    compute_deq_scale,
    compute_quant_bias,
    dequantize_weight,
    quantize_weight,
)
from quant.convention import deq_scale_to_float32, deq_scale_to_int64, to_antiquant_offset

__all__ = [
    "FP",
    "W8A8",
    "W8A16",
    "Scheme",
    "TensorSpec",
    "parse_scheme",
    "scheme_from_name",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor of a layer.

    ``name`` is the suffix after the module name (``"weight"``, ``"deq_scale"``, ...);
    ``shape`` / ``dtype`` are what this package writes; ``accept_shapes`` / ``accept_dtypes``
    list the alternatives other producers (msmodelslim versions, vllm-ascend) are known to
    emit, which loaders must accept and convert. ``required=False`` marks tensors a valid
    checkpoint may omit. ``kind`` says how a parallel layer shards it ("weight", "group" (one
    value per group of k), "channel" (one per output), "tensor" (one value), "bias").
    ``values`` says how its values are checked: "any", "scale" (finite, non-zero) or "offset"
    (finite), in ``use_dtype``, the dtype the kernels use it in.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    required: bool = True
    accept_shapes: tuple[tuple[int, ...], ...] = ()
    accept_dtypes: tuple[torch.dtype, ...] = ()
    kind: str = "channel"
    values: str = "any"
    use_dtype: torch.dtype = torch.float32

    def allowed_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.shape, *self.accept_shapes)

    def allowed_dtypes(self) -> tuple[torch.dtype, ...]:
        return (self.dtype, *self.accept_dtypes)

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype a loader keeps it in before processing: checked values (scales, offsets) in
        float32 (lossless for any producer), the rest as the scheme writes it."""
        return self.dtype if self.values == "any" else torch.float32

    def check(self, shape: Iterable[int], dtype: torch.dtype, *, where: str = "") -> None:
        """Raise ValueError if a stored tensor of ``shape`` / ``dtype`` does not fit this spec."""
        shape = tuple(int(s) for s in shape)
        label = f"{where}.{self.name}" if where else self.name
        if shape not in self.allowed_shapes():
            raise ValueError(
                f"{label}: shape {list(shape)} does not match the expected "
                f"{' or '.join(str(list(s)) for s in self.allowed_shapes())}"
            )
        if dtype not in self.allowed_dtypes():
            raise ValueError(
                f"{label}: dtype {dtype} does not match the expected "
                f"{' or '.join(str(d) for d in self.allowed_dtypes())}"
            )

    def validate(self, t: torch.Tensor, label: str) -> torch.Tensor:
        """Stored values -> the values to keep (``storage_dtype``), checked by ``values`` in
        ``use_dtype``: a float32 scale that becomes 0 or inf in an fp16 kernel is refused."""
        if self.values == "any":
            return t
        if t.dtype == torch.int64:  # deq_scale of fp16 models: float32 bits in an int64
            t = deq_scale_to_float32(t)
        t = t.to(torch.float32)
        used = t.to(self.use_dtype)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label}: contains NaN or inf")
        if not bool(torch.isfinite(used).all()):
            raise ValueError(
                f"{label}: a value overflows {self.use_dtype} (max |value| "
                f"{float(t.abs().max()):.4g}), the dtype the kernel uses it in"
            )
        if self.values == "scale" and bool((used == 0).any()):
            where = "" if bool((t == 0).any()) else f" after the cast to {self.use_dtype}"
            raise ValueError(f"{label}: contains a zero scale{where}")
        return t


def _check_model_dtype(model_dtype: torch.dtype) -> None:
    if model_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"model_dtype: must be float16, bfloat16 or float32, got {model_dtype}")


def _check_nk(n: int, k: int) -> None:
    if n < 1 or k < 1:
        raise ValueError(f"layer shape: n and k must be positive, got n={n}, k={k}")


def _alt(model_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """Float checkpoint dtypes other than the model's (loaders cast)."""
    return tuple(d for d in _FLOAT_DTYPES if d != model_dtype)


def _bias_spec(n: int, model_dtype: torch.dtype) -> TensorSpec:
    return TensorSpec("bias", (n,), model_dtype, True, (), _alt(model_dtype), kind="bias")


def _with_bias(
    out: dict[str, torch.Tensor], bias: torch.Tensor | None, model_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """``out`` plus the float ``bias`` (n,) in the model dtype, if there is one."""
    return out if bias is None else {**out, "bias": bias.to(model_dtype)}


def _float_bias(t: Tensors) -> torch.Tensor | None:
    """The checkpoint's float bias (n,) as float32, None if it has none."""
    b = t.get("bias")
    return None if b is None else b.to(torch.float32)


# quant type string (upper case) -> scheme class; filled by Scheme.__init_subclass__
_BY_QUANT_TYPE: dict[str, type[Scheme]] = {}


class Scheme:
    """Base of the scheme configs. ``quant_type`` is msmodelslim's type string.

    A scheme is the one place that knows its checkpoint tensors (``tensor_specs``), how to
    make them from a float layer (``quantize``) and back (``dequantize``), and its forward
    formula (``kernel_args`` once per loaded layer, ``op_inputs`` / ``linear`` per call),
    which both ``quant.QuantLinear`` and the parallel layers of ``tp_layers`` run. A subclass
    is registered under its ``quant_types`` (``scheme_from_name``).
    """

    quant_type: ClassVar[str] = ""
    quant_types: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls.quant_types:
            _BY_QUANT_TYPE[name] = cls

    @classmethod
    def from_quant_type(cls, key: str, group_size: int, symmetric: bool) -> Scheme:
        """The scheme of quant type ``key`` (one of ``quant_types``)."""
        return cls()

    @property
    def name(self) -> str:
        """msmodelslim's quant type string of this scheme (``"W8A8_DYNAMIC"``, ...)."""
        return self.quant_type

    @property
    def is_quantized(self) -> bool:
        return self.quant_type != "FLOAT"

    @property
    def needs_calibration(self) -> bool:
        """True if quantizing needs observed activation ranges (static W8A8)."""
        return False

    @property
    def group_size(self) -> int:
        return 0

    def tensor_specs(
        self, n: int, k: int, bias: bool, model_dtype: torch.dtype
    ) -> list[TensorSpec]:
        """Checkpoint tensors of a layer with weight (n, k). Overridden per scheme."""
        raise NotImplementedError

    def validate_layer(self, n: int, k: int) -> None:
        """Raise ValueError if a layer of weight (n, k) cannot use this scheme."""
        _check_nk(n, k)

    def spec_map(
        self, n: int, k: int, bias: bool, model_dtype: torch.dtype
    ) -> dict[str, TensorSpec]:
        """``tensor_specs`` keyed by suffix name."""
        return {s.name: s for s in self.tensor_specs(n, k, bias, model_dtype)}

    # -- float layer <-> checkpoint tensors ------------------------------------------------
    def quantize(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        model_dtype: torch.dtype,
        act_range: ActivationRange | None = None,
        act_symmetric: bool = False,
        qweight: QuantizedWeight | None = None,
    ) -> dict[str, torch.Tensor]:
        """weight (n, k) / bias (n,) float -> checkpoint tensors (see quant.quantize_linear);
        qweight: the int8 weight already rounded by another algorithm (quant.gptq)."""
        raise NotImplementedError

    def dequantize(self, t: Tensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Checkpoint tensors -> float32 (weight (n, k), bias (n,) or None)."""
        raise NotImplementedError

    # -- the forward formula ---------------------------------------------------------------
    def kernel_args(self, t: Tensors, model_dtype: torch.dtype) -> dict[str, Any]:
        """Checkpoint-layout scale tensors (float scales in float32) -> the kernels' keyword
        arguments that do not change per call (antiquant / dequant scales, ...)."""
        return {}

    def op_inputs(
        self, x: torch.Tensor, args: Mapping[str, Any], bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Activation x: (..., k) -> (x1, keyword arguments) of ``ascend_ops.kernels.mm_local``
        / ``mm_all_reduce_base``; ``bias``: the float bias this call adds, or None."""
        kw = dict(args)
        if bias is not None:
            kw["bias"] = bias
        return x, kw

    def linear(
        self,
        x: torch.Tensor,
        w_kn: torch.Tensor,
        args: Mapping[str, Any],
        bias: torch.Tensor | None = None,
        x3: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x @ W + bias + x3`` on one rank: x (..., k), w_kn (k, n) -> (..., n), in
        ``args["output_dtype"]`` where the scheme gives one (W8A8: fp32 too, for QuantLinear)."""
        x1, kw = self.op_inputs(x, args, bias)
        return kernels.mm_local(x1, w_kn, x3=x3, output_dtype=args.get("output_dtype"), **kw)


def scheme_from_name(quant_type: str, group_size: int = 0, *, symmetric: bool = True) -> Scheme:
    """Scheme of msmodelslim's quant type string (``"FLOAT"``, ``"W8A16"``, ``"W8A8"``,
    ``"W8A8_DYNAMIC"``; case-insensitive; ``"fp"`` also means FLOAT). ``group_size`` only
    applies to W8A16 (the description file's global ``group_size``)."""
    if not isinstance(quant_type, str):
        raise TypeError(f"quant_type: must be a str, got {type(quant_type).__name__}")
    key = quant_type.strip().upper()
    cls = _BY_QUANT_TYPE.get(key)
    if cls is None:
        raise ValueError(
            f"unknown quant type {quant_type!r}; expected one of "
            + ", ".join(sorted(_BY_QUANT_TYPE))
        )
    return cls.from_quant_type(key, group_size, symmetric)


parse_scheme = scheme_from_name


@dataclass(frozen=True)
class FP(Scheme):
    """Unquantized layer: the float weight (and bias) as in the source model."""

    quant_type: ClassVar[str] = "FLOAT"
    quant_types: ClassVar[tuple[str, ...]] = ("FLOAT", "FP", "FP16", "BF16")

    def tensor_specs(
        self, n: int, k: int, bias: bool, model_dtype: torch.dtype
    ) -> list[TensorSpec]:
        _check_nk(n, k)
        _check_model_dtype(model_dtype)
        # a float checkpoint may be stored in another float dtype than the model runs in
        # (e.g. bf16 weights loaded into an fp32 model): loaders cast.
        specs = [TensorSpec("weight", (n, k), model_dtype, True, (), _alt(model_dtype), "weight")]
        return specs + ([_bias_spec(n, model_dtype)] if bias else [])

    def quantize(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        model_dtype: torch.dtype,
        act_range: ActivationRange | None = None,
        act_symmetric: bool = False,
        qweight: QuantizedWeight | None = None,
    ) -> dict[str, torch.Tensor]:
        return _with_bias({"weight": weight.to(model_dtype)}, bias, model_dtype)

    def dequantize(self, t: Tensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        return t["weight"].to(torch.float32), _float_bias(t)


@dataclass(frozen=True)
class W8A16(Scheme):
    """Weight-only int8 (npu_weight_quant_batchmatmul).

    ``group_size=0``: per-output-channel scale/offset, stored [n, 1]. ``group_size=g``: one
    scale/offset per g consecutive input features of a row, stored [n, k / g]; g must be a
    positive multiple of 32 that divides k and is smaller than k (rule Q3).
    ``symmetric=True``: ``scale = absmax / 127``, offset 0; ``False``: min-max asymmetric,
    ``scale = (max - min) / 255`` with the range widened to include 0, integer offset.

    fp16 caveat: the kernel (and its vendor golden) rounds ``(w + offset) * scale`` to the
    activation dtype before the matmul, so with fp16 a product beyond 65504 is inf (then NaN
    in the sum) even where the exact result fits; the quantizer refuses such fp16 scales.
    """

    quant_type: ClassVar[str] = "W8A16"
    quant_types: ClassVar[tuple[str, ...]] = ("W8A16",)
    group_size: int = 0  # type: ignore[assignment]
    symmetric: bool = True

    @classmethod
    def from_quant_type(cls, key: str, group_size: int, symmetric: bool) -> Scheme:
        return cls(group_size=group_size, symmetric=symmetric)

    def __post_init__(self) -> None:
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int):
            raise TypeError(f"group_size: must be an int, got {type(g).__name__}")
        if g < 0 or g % 32 != 0:
            raise ValueError(
                f"group_size: must be 0 (per-channel) or a positive multiple of 32, got {g}"
            )

    def validate_layer(self, n: int, k: int) -> None:
        _check_nk(n, k)
        g = self.group_size
        if g and k % g != 0:
            raise ValueError(f"group_size {g} does not divide the layer's k = {k}")
        if g and g >= k:
            raise ValueError(
                f"group_size {g} must be smaller than the layer's k = {k} (Q3: g in [32, k-1]); "
                "use group_size 0 (per-channel) for this layer"
            )

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        """Shape of weight_scale / weight_offset: (n, 1) or (n, k // g)."""
        return (n, 1) if self.group_size == 0 else (n, k // self.group_size)

    def tensor_specs(
        self, n: int, k: int, bias: bool, model_dtype: torch.dtype
    ) -> list[TensorSpec]:
        self.validate_layer(n, k)
        _check_model_dtype(model_dtype)
        shape = self.scale_shape(n, k)
        # msmodelslim's docs give weight_scale float32 and per-channel [n]; vllm-ascend creates
        # [n, 1] in the model dtype. We write the latter and accept the former.
        alt_shapes = ((n,),) if self.group_size == 0 else ()
        kind = "channel" if self.group_size == 0 else "group"
        scale = {"kind": kind, "use_dtype": model_dtype}
        specs = [
            TensorSpec("weight", (n, k), torch.int8, kind="weight"),
            TensorSpec(
                "weight_scale",
                shape,
                model_dtype,
                True,
                alt_shapes,
                _alt(model_dtype),
                values="scale",
                **scale,
            ),
            TensorSpec(
                "weight_offset",
                shape,
                model_dtype,
                True,
                alt_shapes,
                _alt(model_dtype),
                values="offset",
                **scale,
            ),
        ]
        return specs + ([_bias_spec(n, model_dtype)] if bias else [])

    def quantize(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        model_dtype: torch.dtype,
        act_range: ActivationRange | None = None,
        act_symmetric: bool = False,
        qweight: QuantizedWeight | None = None,
    ) -> dict[str, torch.Tensor]:

        qw = qweight or quantize_weight(
            weight, group_size=self.group_size, symmetric=self.symmetric, scale_dtype=model_dtype
        )
        out = {"weight": qw.qweight, "weight_scale": qw.scale, "weight_offset": qw.offset}
        return _with_bias(out, bias, model_dtype)

    def dequantize(self, t: Tensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = dequantize_weight(
            t["weight"], t["weight_scale"], t.get("weight_offset"), self.group_size
        )
        return w, _float_bias(t)

    def kernel_args(self, t: Tensors, model_dtype: torch.dtype) -> dict[str, Any]:
        scale = t["weight_scale"].reshape(t["weight_scale"].shape[0], -1)  # (n, 1) or (n, G)
        offset = to_antiquant_offset(t["weight_offset"].float()).reshape(scale.shape)
        # One group (a rank's k equal to g) is per-channel: the op needs g <= k - 1 (Q3).
        per_channel = scale.shape[1] == 1
        if per_channel:  # [n]
            scale, offset = scale.reshape(-1), offset.reshape(-1)
        else:  # [k / g, n]
            scale, offset = scale.t().contiguous(), offset.t().contiguous()
        scale, offset = scale.to(model_dtype), offset.to(model_dtype)
        return {
            "antiquant_scale": scale,
            "antiquant_offset": offset if bool(offset.any()) else None,
            "antiquant_group_size": 0 if per_channel else self.group_size,
        }


@dataclass(frozen=True)
class W8A8(Scheme):
    """int8 weights and int8 activations (npu_quant_matmul), weights symmetric per channel.

    ``dynamic=False`` (msmodelslim ``"W8A8"``): per-tensor activation scale and offset
    calibrated offline; the int32 ``quant_bias`` folds the float bias and the input offset.
    ``dynamic=True`` (``"W8A8_DYNAMIC"``): per-token activation scale computed at run time
    (npu_dynamic_quant); the float bias stays a float bias.
    """

    dynamic: bool = False
    quant_type: ClassVar[str] = "W8A8"  # per instance: see ``name``
    quant_types: ClassVar[tuple[str, ...]] = ("W8A8", "W8A8_DYNAMIC")

    @classmethod
    def from_quant_type(cls, key: str, group_size: int, symmetric: bool) -> Scheme:
        return cls(dynamic=key == "W8A8_DYNAMIC")

    @property
    def name(self) -> str:
        return "W8A8_DYNAMIC" if self.dynamic else "W8A8"

    @property
    def needs_calibration(self) -> bool:
        return not self.dynamic

    @staticmethod
    def deq_scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
        """int64 (float32 bits zero-extended) for fp16 models, float32 otherwise (msmodelslim)."""
        return torch.int64 if model_dtype == torch.float16 else torch.float32

    @staticmethod
    def _dequant_dtype(model_dtype: torch.dtype) -> torch.dtype:
        """dtype of the kernel's dequant scale (dtype table 3): bf16 for bf16 output, else f32."""
        return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float32

    def tensor_specs(
        self, n: int, k: int, bias: bool, model_dtype: torch.dtype
    ) -> list[TensorSpec]:
        self.validate_layer(n, k)
        _check_model_dtype(model_dtype)
        alt = _alt(model_dtype)
        deq_dt = self._dequant_dtype(model_dtype)
        specs = [TensorSpec("weight", (n, k), torch.int8, kind="weight")]
        if self.dynamic:
            specs += [
                TensorSpec(
                    "weight_scale",
                    (n, 1),
                    model_dtype,
                    True,
                    ((n,),),
                    alt,
                    values="scale",
                    use_dtype=deq_dt,
                ),
                TensorSpec(
                    "weight_offset", (n, 1), model_dtype, True, ((n,),), alt, values="offset"
                ),
            ]
            return specs + ([_bias_spec(n, model_dtype)] if bias else [])
        # vllm-ascend declares input_offset int8; msmodelslim's docs give the model dtype.
        specs += [
            TensorSpec("input_scale", (1,), model_dtype, True, (), alt, "tensor", "scale"),
            TensorSpec(
                "input_offset", (1,), model_dtype, True, (), (*alt, torch.int8), "tensor", "offset"
            ),
            TensorSpec(
                "deq_scale",
                (n,),
                self.deq_scale_dtype(model_dtype),
                True,
                (),
                (torch.int64, torch.float32),
                values="scale",
                use_dtype=deq_dt,
            ),
            TensorSpec("quant_bias", (n,), torch.int32, kind="bias"),
            TensorSpec("weight_scale", (n, 1), model_dtype, False, ((n,),), alt, values="scale"),
            TensorSpec("weight_offset", (n, 1), model_dtype, False, ((n,),), alt, values="offset"),
        ]
        return specs

    def quantize(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        model_dtype: torch.dtype,
        act_range: ActivationRange | None = None,
        act_symmetric: bool = False,
        qweight: QuantizedWeight | None = None,
    ) -> dict[str, torch.Tensor]:

        qw = qweight or quantize_weight(weight, symmetric=True, scale_dtype=model_dtype)
        out = {"weight": qw.qweight, "weight_scale": qw.scale, "weight_offset": qw.offset}
        if self.dynamic:
            return _with_bias(out, bias, model_dtype)
        if act_range is None:
            raise ValueError("static W8A8 needs act_range (calibrated input range)")
        in_scale, in_offset = activation_qparams(act_range, model_dtype, symmetric=act_symmetric)
        deq = compute_deq_scale(in_scale, qw.scale)
        packed = self.deq_scale_dtype(model_dtype) == torch.int64
        return {
            **out,
            "input_scale": in_scale,
            "input_offset": in_offset,
            "deq_scale": deq_scale_to_int64(deq) if packed else deq,
            "quant_bias": compute_quant_bias(bias, deq, qw.qweight, in_offset),
        }

    def dequantize(self, t: Tensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For static W8A8 the returned bias is the float bias folded in quant_bias
        (``(quant_bias + input_offset * sum_k Wq) * deq_scale``), None if that is all zero."""
        q = t["weight"]
        if self.dynamic:
            return dequantize_weight(q, t["weight_scale"], t.get("weight_offset")), _float_bias(t)
        deq = deq_scale_to_float32(t["deq_scale"])
        if "weight_scale" in t:
            ws = t["weight_scale"].to(torch.float32).reshape(-1)
        else:
            ws = deq / t["input_scale"].to(torch.float32).reshape(())
        w = dequantize_weight(q, ws.reshape(-1, 1))
        off = t["input_offset"].to(torch.float64).reshape(())
        acc = t["quant_bias"].to(torch.float64) + off * q.to(torch.float64).sum(dim=1)
        folded = (acc * deq.to(torch.float64)).to(torch.float32)
        return w, (None if bool((acc == 0).all()) else folded)

    def kernel_args(self, t: Tensors, model_dtype: torch.dtype) -> dict[str, Any]:
        """The dequant scale in the dtype table's form: bf16 for bf16 output; for fp16 output a
        trans_quant_param-packed int64 (static) or float32 with a per-token scale (dynamic);
        float32 for an fp32 model (QuantLinear only: the fused op has no fp32 W8A8 output)."""
        if self.dynamic and bool(t["weight_offset"].any()):
            raise ValueError(
                "weight_offset: W8A8_DYNAMIC needs symmetric weights (all offsets 0); an "
                "int8 x int8 matmul cannot apply a weight offset"
            )
        deq = t["weight_scale" if self.dynamic else "deq_scale"]
        deq = deq_scale_to_float32(deq).reshape(-1).contiguous()
        if model_dtype == torch.bfloat16:
            deq = deq.to(torch.bfloat16)
        elif model_dtype == torch.float16 and not self.dynamic:
            deq = trans_quant_param(deq)
        args: dict[str, Any] = {"dequant_scale": deq, "output_dtype": model_dtype}
        if not self.dynamic:
            args["input_scale"] = t["input_scale"].float().reshape(1)
            args["input_offset"] = t["input_offset"].float().reshape(1)
            args["quant_bias"] = t["quant_bias"]
        return args

    def op_inputs(
        self, x: torch.Tensor, args: Mapping[str, Any], bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Static: x quantized with the calibrated scale, ``quant_bias`` (float bias and input
        offset folded) as the int32 bias; dynamic: per-token quantization, float bias."""
        kw: dict[str, Any] = {"dequant_scale": args["dequant_scale"]}
        if self.dynamic:
            x1, pertoken = kernels.dynamic_quant(x)
            kw["pertoken_scale"] = pertoken.reshape(-1)
        else:
            x1 = kernels.quantize(x, args["input_scale"], args["input_offset"], torch.int8, -1)
            bias = args.get("quant_bias")
        if bias is not None:
            kw["bias"] = bias
        return x1, kw
