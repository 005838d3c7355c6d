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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

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


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor of a layer.

    ``name`` is the suffix after the module name (``"weight"``, ``"deq_scale"``, ...);
    ``shape`` / ``dtype`` are what this package writes; ``accept_shapes`` / ``accept_dtypes``
    list the alternatives other producers (msmodelslim versions, vllm-ascend) are known to
    emit, which loaders must accept and convert. ``required=False`` marks tensors a valid
    checkpoint may omit.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    required: bool = True
    accept_shapes: tuple[tuple[int, ...], ...] = ()
    accept_dtypes: tuple[torch.dtype, ...] = ()

    def allowed_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.shape, *self.accept_shapes)

    def allowed_dtypes(self) -> tuple[torch.dtype, ...]:
        return (self.dtype, *self.accept_dtypes)

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


def _check_model_dtype(model_dtype: torch.dtype) -> None:
    if model_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"model_dtype: must be float16, bfloat16 or float32, got {model_dtype}")


def _check_nk(n: int, k: int) -> None:
    if n < 1 or k < 1:
        raise ValueError(f"layer shape: n and k must be positive, got n={n}, k={k}")


class Scheme:
    """Base of the scheme configs. ``quant_type`` is msmodelslim's type string."""

    quant_type: ClassVar[str] = ""

    @property
    def name(self) -> str:
        """msmodelslim's quant type string of this scheme (``"W8A8_DYNAMIC"``, ...)."""
        return self.quant_type

    @property
    def is_quantized(self) -> bool:
        return self.quant_type != "FLOAT"

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


@dataclass(frozen=True)
class FP(Scheme):
    """Unquantized layer: the float weight (and bias) as in the source model."""

    quant_type: ClassVar[str] = "FLOAT"

    def tensor_specs(
        self, n: int, k: int, bias: bool, model_dtype: torch.dtype
    ) -> list[TensorSpec]:
        _check_nk(n, k)
        _check_model_dtype(model_dtype)
        # a float checkpoint may be stored in another float dtype than the model runs in
        # (e.g. bf16 weights loaded into an fp32 model): loaders cast.
        alt = tuple(d for d in _FLOAT_DTYPES if d != model_dtype)
        specs = [TensorSpec("weight", (n, k), model_dtype, True, (), alt)]
        if bias:
            specs.append(TensorSpec("bias", (n,), model_dtype, True, (), alt))
        return specs


@dataclass(frozen=True)
class W8A16(Scheme):
    """Weight-only int8 (npu_weight_quant_batchmatmul).

    ``group_size=0``: per-output-channel scale/offset, stored [n, 1]. ``group_size=g``: one
    scale/offset per g consecutive input features of a row, stored [n, k / g]; g must be a
    positive multiple of 32 that divides k and is smaller than k (rule Q3).
    ``symmetric=True``: ``scale = absmax / 127``, offset 0; ``False``: min-max asymmetric,
    ``scale = (max - min) / 255`` with the range widened to include 0, integer offset.
    """

    quant_type: ClassVar[str] = "W8A16"
    group_size: int = 0  # type: ignore[assignment]
    symmetric: bool = True

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
        alt_dtypes = tuple(d for d in _FLOAT_DTYPES if d != model_dtype)
        specs = [
            TensorSpec("weight", (n, k), torch.int8),
            TensorSpec("weight_scale", shape, model_dtype, True, alt_shapes, alt_dtypes),
            TensorSpec("weight_offset", shape, model_dtype, True, alt_shapes, alt_dtypes),
        ]
        if bias:
            specs.append(TensorSpec("bias", (n,), model_dtype, True, (), alt_dtypes))
        return specs


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

    @property
    def name(self) -> str:
        return "W8A8_DYNAMIC" if self.dynamic else "W8A8"

    @staticmethod
    def deq_scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
        """int64 (float32 bits zero-extended) for fp16 models, float32 otherwise (msmodelslim)."""
        return torch.int64 if model_dtype == torch.float16 else torch.float32

    def tensor_specs(
        self, n: int, k: int, bias: bool, model_dtype: torch.dtype
    ) -> list[TensorSpec]:
        self.validate_layer(n, k)
        _check_model_dtype(model_dtype)
        alt_dtypes = tuple(d for d in _FLOAT_DTYPES if d != model_dtype)
        specs = [TensorSpec("weight", (n, k), torch.int8)]
        if self.dynamic:
            specs += [
                TensorSpec("weight_scale", (n, 1), model_dtype, True, ((n,),), alt_dtypes),
                TensorSpec("weight_offset", (n, 1), model_dtype, True, ((n,),), alt_dtypes),
            ]
            if bias:
                specs.append(TensorSpec("bias", (n,), model_dtype, True, (), alt_dtypes))
            return specs
        # vllm-ascend declares input_offset int8; msmodelslim's docs give the model dtype.
        specs += [
            TensorSpec("input_scale", (1,), model_dtype, True, (), alt_dtypes),
            TensorSpec("input_offset", (1,), model_dtype, True, (), (*alt_dtypes, torch.int8)),
            TensorSpec(
                "deq_scale",
                (n,),
                self.deq_scale_dtype(model_dtype),
                True,
                (),
                (torch.int64, torch.float32),
            ),
            TensorSpec("quant_bias", (n,), torch.int32),
            TensorSpec("weight_scale", (n, 1), model_dtype, False, ((n,),), alt_dtypes),
            TensorSpec("weight_offset", (n, 1), model_dtype, False, ((n,),), alt_dtypes),
        ]
        return specs


_NAMES = {"FLOAT": "fp", "W8A16": "w8a16", "W8A8": "w8a8", "W8A8_DYNAMIC": "w8a8_dynamic"}


def scheme_from_name(quant_type: str, group_size: int = 0, *, symmetric: bool = True) -> Scheme:
    """Scheme of msmodelslim's quant type string (``"FLOAT"``, ``"W8A16"``, ``"W8A8"``,
    ``"W8A8_DYNAMIC"``; case-insensitive; ``"fp"`` also means FLOAT). ``group_size`` only
    applies to W8A16 (the description file's global ``group_size``)."""
    if not isinstance(quant_type, str):
        raise TypeError(f"quant_type: must be a str, got {type(quant_type).__name__}")
    key = quant_type.strip().upper()
    if key in ("FLOAT", "FP", "FP16", "BF16"):
        return FP()
    if key == "W8A16":
        return W8A16(group_size=group_size, symmetric=symmetric)
    if key == "W8A8":
        return W8A8(dynamic=False)
    if key == "W8A8_DYNAMIC":
        return W8A8(dynamic=True)
    raise ValueError(
        f"unknown quant type {quant_type!r}; expected one of {', '.join(_NAMES)} "
        "(or the CLI names " + ", ".join(sorted(set(_NAMES.values()))) + ")"
    )


parse_scheme = scheme_from_name
