"""Per-scheme method objects (vLLM style), one registry keyed by scheme type: a new quant scheme
is its dataclass in quant.schemes (tensors and formula) plus one class here, registered with
``@register(SchemeType)``; no layer changes.

The layer owns the parameters in checkpoint layout ((n, k) weight, scales as stored). The
method's ``process_weights_after_loading`` returns what the kernels take: the weight as (k, n)
(FRACTAL_NZ on Ascend when enabled) and the scheme's kernel arguments (scales packed / cast,
msmodelslim offsets negated: quant.schemes ``kernel_args``); the layer installs them.
``apply`` (local matmul), ``apply_fused`` (``mm_all_reduce_base``) and, for sequence
parallelism, ``apply_all_gather`` / ``apply_reduce_scatter`` (``all_gather_base_mm`` /
``mm_reduce_scatter_base``, for the schemes ``sp_fusable`` names) run the scheme's one formula
(``op_inputs``), so the fused (prefill) and unfused (decode) paths compute the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

import ascend_ops
from ascend_ops.contract import FORMAT_NZ
from quant.schemes import FP, W8A8, W8A16, Scheme, TensorSpec

__all__ = ["FPMethod", "LinearMethod", "W8A8Method", "W8A16Method", "method_for", "register"]


class LinearLayer(Protocol):
    """What a method reads of its layer (tp_layers.linear.ParallelLinearBase)."""

    where: str
    input_size: int
    output_size: int
    has_bias: bool
    params_dtype: torch.dtype
    nz: bool
    adds_bias: bool
    param_views: dict[str, torch.Tensor | None]  # "weight": the (k, n) kernel weight
    kernel_args: dict[str, Any]

    def add_checkpoint_param(self, spec: TensorSpec) -> None: ...


_METHODS: dict[type[Scheme], type[LinearMethod]] = {}


def register(scheme_type: type[Scheme]):
    """Class decorator: the method class of ``scheme_type``."""

    def deco(cls: type[LinearMethod]) -> type[LinearMethod]:
        _METHODS[scheme_type] = cls
        return cls

    return deco


def method_for(scheme: Scheme | None) -> LinearMethod:
    """The method object of a quant scheme (None = FP), found by the scheme's type."""
    scheme = scheme if scheme is not None else FP()
    cls = _METHODS.get(type(scheme))
    if cls is None:
        raise TypeError(f"quant: unsupported scheme {scheme!r} (no method registered)")
    return cls(scheme)


class LinearMethod:
    """Base: the scheme's checkpoint tensors as parameters, its formula on the kernels."""

    #: FRACTAL_NZ weight on Ascend when the layer enables it (Atlas A2 rejects NZ for FP)
    nz_weight = True

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme

    def create_weights(self, layer: LinearLayer) -> None:
        """Register one sharded parameter per checkpoint tensor (quant.schemes.tensor_specs)."""
        specs = self.scheme.tensor_specs(
            layer.output_size, layer.input_size, layer.has_bias, layer.params_dtype
        )
        for spec in specs:
            layer.add_checkpoint_param(spec)

    def process_weights_after_loading(
        self, layer: LinearLayer, t: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        """Checkpoint-layout local tensors ``t`` -> the kernel arguments (``"weight"``: the
        (k, n) weight, the rest keyword arguments of the scheme's formula). No side effects."""
        try:
            args = self.scheme.kernel_args(t, layer.params_dtype)
        except ValueError as e:
            raise ValueError(f"{layer.where}.{e}") from e
        args["weight"] = self._weight_kn(t["weight"], layer.nz and self.nz_weight)
        return args

    @staticmethod
    def _weight_kn(w: torch.Tensor, nz: bool) -> torch.Tensor:
        """The (k, n) weight the kernels take. Ascend: contiguous (k, n), NZ-cast when ``nz``.
        Elsewhere: a transposed view of the (n, k) checkpoint storage (no copy; CONTRACT C2
        accepts it; CPU GEMMs read it much faster at small m: ``python -m bench op``)."""
        if ascend_ops.backend.select(w) is not ascend_ops.Backend.ASCEND:
            return w.t()
        w = w.t().contiguous()
        if nz:
            from ascend_ops import layout

            w = layout.format_cast(w, FORMAT_NZ)
        return w

    def apply(
        self,
        layer: LinearLayer,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This rank's ``x @ W + bias + residual``: x (..., k_local) -> (..., n_local)."""
        return self.scheme.linear(x, layer.param_views["weight"], layer.kernel_args, bias, residual)

    def apply_fused(
        self,
        layer: LinearLayer,
        x: torch.Tensor,
        hcom: str,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``all_reduce(x @ W + bias) + residual`` in one ``mm_all_reduce_base`` call."""
        bias, residual = self.fused_bias(x, bias, residual)
        x1, kw = self.scheme.op_inputs(x, layer.kernel_args, bias)
        return ascend_ops.mm_all_reduce_base(
            x1, layer.param_views["weight"], hcom, x3=residual, **kw
        )

    def fused_bias(
        self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(bias, x3) the fused op takes for this call's float ``bias`` and ``residual``."""
        return bias, residual

    # -- sequence parallelism: all_gather_base_mm / mm_reduce_scatter_base --------------------
    def sp_fusable(self) -> bool:
        """True if the sequence-parallel MC2 kernels take this scheme (FP and W8A8 dynamic:
        they have no weight-only antiquant input and refuse a bias, G5 / G6)."""
        return False

    def sp_inputs(self, layer: LinearLayer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """x (rows, k) -> (x1, keyword arguments) of the sequence-parallel kernels."""
        raise NotImplementedError(f"{layer.where}: {self.scheme.name} has no fused SP kernel")

    def apply_all_gather(
        self,
        layer: LinearLayer,
        x: torch.Tensor,
        hcom: str,
        world_size: int,
        gather_input: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``allgather(x) @ W`` in one ``all_gather_base_mm``: x (rows, ..., k) this rank's
        (padded) tokens -> (rows * world_size, ..., n_local), ranks' rows in rank order, and
        with ``gather_input`` the kernel's gathered x1 (rows * world_size, ..., k) (the
        activation itself in FP; int8 when quantized), else None."""
        x1, kw = self.sp_inputs(layer, x.reshape(-1, x.shape[-1]))
        y, gathered = ascend_ops.all_gather_base_mm(
            x1,
            layer.param_views["weight"],
            hcom,
            world_size,
            gather_output=gather_input,
            comm_mode="aiv",
            **kw,
        )
        rows = (x.shape[0] * world_size, *x.shape[1:-1])
        return y.reshape(*rows, y.shape[-1]), (
            gathered.reshape(*rows, x.shape[-1]) if gather_input else None
        )

    def apply_reduce_scatter(
        self, layer: LinearLayer, x: torch.Tensor, hcom: str, world_size: int
    ) -> torch.Tensor:
        """``reducescatter(x @ W)`` in one ``mm_reduce_scatter_base``: x (m, ..., k_local) with
        m divisible by world_size -> this rank's (m / world_size, ..., n) rows of the sum."""
        x1, kw = self.sp_inputs(layer, x.reshape(-1, x.shape[-1]))
        y = ascend_ops.mm_reduce_scatter_base(
            x1, layer.param_views["weight"], hcom, world_size, comm_mode="aiv", **kw
        )
        return y.reshape(x.shape[0] // world_size, *x.shape[1:-1], y.shape[-1])


@register(FP)
class FPMethod(LinearMethod):
    """fp16 / bf16 / fp32 weights, ND (Atlas A2 rejects NZ in the FP scenario)."""

    nz_weight = False

    def sp_fusable(self) -> bool:
        return True

    def sp_inputs(self, layer: LinearLayer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return x.contiguous(), {}


@register(W8A16)
class W8A16Method(LinearMethod):
    """int8 weight, fp activations: ``x @ ((w + antiquant_offset) * antiquant_scale)``.

    fp16: the kernel rounds ``(w + offset) * scale`` to fp16 before the matmul (vendor golden,
    ascend_ops.kernels.weight_quant_matmul), so a product beyond 65504 is inf / NaN even where
    the exact result fits; quant's quantizer refuses such fp16 scales."""


@register(W8A8)
class W8A8Method(LinearMethod):
    """int8 x int8. Static: per-tensor activation scale / offset calibrated offline; the int32
    ``quant_bias`` (float bias and input offset folded) is added once: by every column rank,
    by rank 0 of a row layer, whatever the path. Dynamic: per-token activation scale; inside
    the fused op a float bias must be int32, so it is added through ``x3`` instead."""

    def create_weights(self, layer: LinearLayer) -> None:
        if layer.params_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"{layer.where}: W8A8 output must be float16 or bfloat16 "
                f"(dtype table 3), got params_dtype {layer.params_dtype}: load the model with "
                "dtype=torch.bfloat16 (or torch.float16)"
            )
        super().create_weights(layer)

    def process_weights_after_loading(
        self, layer: LinearLayer, t: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        args = super().process_weights_after_loading(layer, t)
        if "quant_bias" in args and not layer.adds_bias:
            args["quant_bias"] = None
        return args

    def fused_bias(
        self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if bias is not None:  # dynamic: a float bias -> x3
            pb = bias.expand(*x.shape[:-1], bias.shape[-1])
            residual = pb.contiguous() if residual is None else residual + pb
        return None, residual

    def sp_fusable(self) -> bool:
        return self.scheme.dynamic  # static: the int32 quant_bias has no place in the kernels

    def sp_inputs(self, layer: LinearLayer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Per-token quantization of this rank's rows (the scheme's formula): x1_scale is one
        float32 scale per row of x1, which all_gather_base_mm gathers with x1 (G6); x2_scale
        the per-channel dequant scale as float32 (1, n) (a bf16 one widens exactly)."""
        x1, kw = self.scheme.op_inputs(x, layer.kernel_args, None)
        return x1, {
            "x1_scale": kw["pertoken_scale"].reshape(-1, 1),
            "x2_scale": kw["dequant_scale"].float().reshape(1, -1),
            "output_dtype": layer.kernel_args["output_dtype"],
        }
