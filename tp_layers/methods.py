"""Per-scheme method objects (vLLM style): ``create_weights`` / ``process_weights_after_loading``
/ ``prepare`` — a new quant scheme is one new class here and no layer changes.

The layer owns the parameters in checkpoint layout ((n, k) weight, scales as stored) until
``process_weights_after_loading`` turns them, in place, into what the kernels take: the weight
transposed to (k, n) contiguous (FRACTAL_NZ on Ascend when enabled), scales packed / cast to
the documented dtypes, msmodelslim offsets negated (quant.convention). ``prepare`` then turns an
activation into the arguments of ``ascend_ops.mm_local`` / ``mm_all_reduce_base``, so the fused
(prefill) and unfused (decode) paths compute the same formula.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

import ascend_ops
from ascend_ops import kernels
from quant.convention import to_antiquant_offset
from quant.schemes import FP, W8A8, W8A16, Scheme

if TYPE_CHECKING:
    from tp_layers.linear import ParallelLinearBase

__all__ = [
    "FPMethod",
    "LinearMethod",
    "W8A8DynamicMethod",
    "W8A8StaticMethod",
    "W8A16Method",
    "method_for",
]

FORMAT_NZ = 29


class Prepared:
    """The arguments of one kernel call: x1, keyword args, and a float bias to add after."""

    __slots__ = ("kwargs", "post_bias", "x1")

    def __init__(
        self, x1: torch.Tensor, kwargs: dict[str, Any], post_bias: torch.Tensor | None
    ) -> None:
        self.x1 = x1
        self.kwargs = kwargs
        self.post_bias = post_bias


class LinearMethod:
    """Base: creates the parameters the scheme's checkpoint holds (quant.schemes.tensor_specs)."""

    scheme: Scheme

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme

    # -- creation -----------------------------------------------------------------------
    def create_weights(self, layer: ParallelLinearBase) -> None:
        specs = self.scheme.tensor_specs(
            layer.output_size, layer.input_size, layer.has_bias, layer.params_dtype
        )
        for spec in specs:
            layer.add_checkpoint_param(spec)

    def storage_dtype(
        self, name: str, spec_dtype: torch.dtype, layer: ParallelLinearBase
    ) -> torch.dtype:
        """dtype a parameter is kept in before processing: float scales in float32 (lossless for
        any producer), integers as stored, float weights / bias in the model dtype."""
        if name in ("weight", "bias", "quant_bias"):
            return spec_dtype if name != "bias" else layer.params_dtype
        return torch.float32

    # -- processing ---------------------------------------------------------------------
    def process_weights_after_loading(self, layer: ParallelLinearBase) -> None:
        raise NotImplementedError

    def _weight_kn(self, layer: ParallelLinearBase, nz: bool) -> torch.Tensor:
        """The (k, n) weight the kernels take. Ascend: contiguous (k, n), NZ-cast when ``nz``.
        Elsewhere: a transposed view of the (n, k) checkpoint storage (no copy; CONTRACT C2
        accepts it). CPU GEMMs read that layout much faster at small m: bench (python -m bench
        op, 1 thread, k=2048 n=4096) bf16 m=1: 5.8 ms vs 59 ms for a (k, n) contiguous copy,
        m=16: 54 vs 1866 ms; int8 torch._int_mm m=1: 12 vs 92 ms."""
        if ascend_ops.backend.select(layer.weight.data) is not ascend_ops.Backend.ASCEND:
            return layer.weight.data.t()
        w = layer.weight.data.t().contiguous()
        if nz:
            from ascend_ops import layout

            w = layout.format_cast(w, FORMAT_NZ)
        return w

    # -- forward ------------------------------------------------------------------------
    def prepare(
        self, layer: ParallelLinearBase, x: torch.Tensor, owner: bool, skip_bias: bool, fused: bool
    ) -> Prepared:
        """Kernel arguments for activation ``x``. ``owner``: this rank adds the terms that must
        be added once (bias of a row-parallel layer: rank 0). ``skip_bias``: the float bias is
        returned to the caller instead (Megatron's skip_bias_add). ``fused``: for the fused op,
        whose W8A8 bias must be int32 (a float bias then goes to ``post_bias``)."""
        raise NotImplementedError


class FPMethod(LinearMethod):
    """fp16 / bf16 / fp32 weights. FP weights stay ND (Atlas A2 rejects NZ in the FP scenario)."""

    def process_weights_after_loading(self, layer: ParallelLinearBase) -> None:
        layer.weight.data = self._weight_kn(layer, nz=False)
        layer.op_args = {}

    def prepare(
        self, layer: ParallelLinearBase, x: torch.Tensor, owner: bool, skip_bias: bool, fused: bool
    ) -> Prepared:
        kw: dict[str, Any] = {}
        if owner and not skip_bias and layer.bias is not None:
            kw["bias"] = layer.bias
        return Prepared(x, kw, None)


class W8A16Method(LinearMethod):
    """int8 weight, fp activations: ``x @ ((w + antiquant_offset) * antiquant_scale)``."""

    def process_weights_after_loading(self, layer: ParallelLinearBase) -> None:
        dt = layer.params_dtype
        scale = layer.weight_scale.data  # (n, 1) per-channel or (n, G) per-group, float32
        offset = to_antiquant_offset(layer.weight_offset.data)
        groups = scale.shape[1]
        group_size = layer.scheme.group_size if groups > 1 else 0
        # One group per rank (k_local == g) is per-channel for this rank; the op requires
        # g <= k - 1 (Q3), so it is passed as per-channel.
        if groups == 1:
            a_scale, a_offset = scale.reshape(-1).to(dt), offset.reshape(-1).to(dt)
        else:
            a_scale, a_offset = scale.t().contiguous().to(dt), offset.t().contiguous().to(dt)
        # off Ascend this is the (k, n) view of the (n, k) storage: the layout the int8pack fast
        # path reads with no copy (kernels.prepare_w8a16_weight)
        layer.weight.data = self._weight_kn(layer, layer.nz)
        layer.weight_scale.data = a_scale
        layer.weight_offset.data = a_offset
        layer.op_args = {
            "antiquant_scale": a_scale,
            "antiquant_offset": a_offset if bool(a_offset.any()) else None,
            "antiquant_group_size": group_size,
        }

    def prepare(
        self, layer: ParallelLinearBase, x: torch.Tensor, owner: bool, skip_bias: bool, fused: bool
    ) -> Prepared:
        kw = dict(layer.op_args)
        if owner and not skip_bias and layer.bias is not None:
            kw["bias"] = layer.bias
        return Prepared(x, kw, None)


def _w8a8_dequant(deq_f32: torch.Tensor, model_dtype: torch.dtype, pertoken: bool) -> torch.Tensor:
    """The dequant scale in the dtype table's form: bf16 for bf16 output; for fp16 output a
    trans_quant_param-packed int64 (static) or float32 with a per-token scale (dynamic)."""
    if model_dtype == torch.bfloat16:
        return deq_f32.to(torch.bfloat16)
    if pertoken:
        return deq_f32.float().contiguous()
    return ascend_ops.trans_quant_param(deq_f32.float().contiguous())


def _check_w8a8_dtype(layer: ParallelLinearBase) -> None:
    if layer.params_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"{layer.prefix or type(layer).__name__}: W8A8 output must be float16 or bfloat16 "
            f"(dtype table 3), got params_dtype {layer.params_dtype}: load the model with "
            "dtype=torch.bfloat16 (or torch.float16)"
        )


class W8A8StaticMethod(LinearMethod):
    """int8 x int8 with a per-tensor activation scale/offset calibrated offline; the int32
    ``quant_bias`` folds the float bias and the input offset and is always applied (once)."""

    def create_weights(self, layer: ParallelLinearBase) -> None:
        _check_w8a8_dtype(layer)
        super().create_weights(layer)

    def process_weights_after_loading(self, layer: ParallelLinearBase) -> None:
        deq = layer.deq_scale.data.reshape(-1).float()
        layer.weight.data = self._weight_kn(layer, layer.nz)
        layer.deq_scale.data = _w8a8_dequant(deq, layer.params_dtype, pertoken=False)
        layer.op_args = {"dequant_scale": layer.deq_scale.data}
        layer.input_scale.data = layer.input_scale.data.float().reshape(1)
        layer.input_offset.data = layer.input_offset.data.float().reshape(1)

    def prepare(
        self, layer: ParallelLinearBase, x: torch.Tensor, owner: bool, skip_bias: bool, fused: bool
    ) -> Prepared:
        x1 = kernels.quantize(x, layer.input_scale, layer.input_offset, torch.int8, -1, True)
        kw = dict(layer.op_args)
        if owner:  # folds the input offset: never skipped
            kw["bias"] = layer.quant_bias
        return Prepared(x1, kw, None)


class W8A8DynamicMethod(LinearMethod):
    """int8 x int8 with a per-token activation scale computed at run time (dynamic_quant)."""

    def create_weights(self, layer: ParallelLinearBase) -> None:
        _check_w8a8_dtype(layer)
        super().create_weights(layer)

    def process_weights_after_loading(self, layer: ParallelLinearBase) -> None:
        if bool(layer.weight_offset.data.any()):
            raise ValueError(
                f"{layer.prefix or type(layer).__name__}.weight_offset: W8A8_DYNAMIC needs symmetric "
                "weights (all offsets 0); an int8 x int8 matmul cannot apply a weight offset"
            )
        scale = layer.weight_scale.data.reshape(-1).float()
        layer.weight.data = self._weight_kn(layer, layer.nz)
        layer.weight_scale.data = _w8a8_dequant(scale, layer.params_dtype, pertoken=True)
        layer.op_args = {"dequant_scale": layer.weight_scale.data}

    def prepare(
        self, layer: ParallelLinearBase, x: torch.Tensor, owner: bool, skip_bias: bool, fused: bool
    ) -> Prepared:
        x1, pertoken = kernels.dynamic_quant(x)
        kw = dict(layer.op_args)
        kw["pertoken_scale"] = pertoken.reshape(-1)
        bias = layer.bias if owner and not skip_bias else None
        if bias is not None and fused:
            return Prepared(x1, kw, bias)
        if bias is not None:
            kw["bias"] = bias
        return Prepared(x1, kw, None)


def method_for(scheme: Scheme | None) -> LinearMethod:
    """The method object of a quant scheme (None = FP)."""
    if scheme is None or isinstance(scheme, FP):
        return FPMethod(scheme or FP())
    if isinstance(scheme, W8A16):
        return W8A16Method(scheme)
    if isinstance(scheme, W8A8):
        return W8A8DynamicMethod(scheme) if scheme.dynamic else W8A8StaticMethod(scheme)
    raise TypeError(f"quant: unsupported scheme {scheme!r}")
