"""Quantization algorithms: min-max weight quantization, activation calibration, bias folding.

Conventions (msmodelslim; see ``quant.convention`` for the kernel side):

- weights: ``w ~ (q - offset) * scale``, ``q = rint(w / scale + offset)`` saturated to int8,
  computed by ``ascend_ops.kernels.quantize`` (round half to even, as Atlas A2's CAST_RINT).
- static activations: ``x ~ (x_q - input_offset) * input_scale``,
  ``x_q = rint(x / input_scale + input_offset)``; ``deq_scale = input_scale * weight_scale``
  (float32, per output channel); ``quant_bias = rint(bias / deq_scale) - input_offset *
  sum_k(Wq)`` (int32), so that ``y = (x_q @ Wq^T + quant_bias) * deq_scale``.
- dynamic activations: ``ascend_ops.kernels.dynamic_quant`` (per token, symmetric).

Scales are *stored* in the model dtype (bf16 / fp16 / fp32). To keep the error bound
``|w - w_hat| <= scale / 2`` true for the scale a loader actually reads, every scale is first
rounded to its storage dtype (upwards, so that the range still fits in int8) and the values are
then quantized with that stored scale. Offsets are integers in [-128, 127], exact in every
float dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ascend_ops.kernels import dynamic_quant, quantize
from quant.convention import deq_scale_to_float32

if TYPE_CHECKING:
    from quant.schemes import Scheme

__all__ = [
    "ActivationRange",
    "MSEObserver",
    "MinMaxObserver",
    "PercentileObserver",
    "QuantizedWeight",
    "activation_qparams",
    "compute_deq_scale",
    "compute_quant_bias",
    "dequantize_linear",
    "dequantize_weight",
    "dynamic_quant_activation",
    "quantize_activation",
    "quantize_linear",
    "quantize_weight",
    "storage_scale",
    "weight_qparams",
]


# --------------------------------------------------------------------------------------------
# Scales in their storage dtype
# --------------------------------------------------------------------------------------------


def _next_up(t: torch.Tensor) -> torch.Tensor:
    """Next representable value above each positive finite element of a bf16/fp16 tensor."""
    return (t.contiguous().view(torch.int16) + 1).view(t.dtype)


def storage_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 scale -> the same scale representable in ``dtype``, never smaller than the input
    (rounded up) and at least ``finfo(dtype).tiny`` (so zero rows get a usable scale).

    scale: any shape, float (>= 0). Returns ``dtype``, same shape.
    """
    s = scale.to(torch.float32).clamp_min(torch.finfo(dtype).tiny)
    out = s.to(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        low = out.to(torch.float32) < s
        if bool(low.any()):
            out = torch.where(low, _next_up(out), out)
    return out


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """int8 weight and its msmodelslim scale/offset.

    qweight: (n, k) int8. scale / offset: (n, 1) per-channel or (n, k // group_size) per-group,
    in the storage dtype; ``w ~ (qweight - offset) * scale``.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group_size: int = 0


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n, k) -> (n, k // g, g) (per-group) or (n, 1, k) (per-channel)."""
    n, k = w.shape
    if group_size == 0:
        return w.reshape(n, 1, k)
    if k % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide k = {k}")
    return w.reshape(n, k // group_size, group_size)


def weight_qparams(
    w: torch.Tensor, symmetric: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max int8 (scale, offset) of the rows of w (..., g) float32 over its last dim, both
    (...) in ``dtype``: symmetric ``absmax / 127``, offset 0; else ``(max - min) / 255`` over
    the range widened to include 0 and ``offset = rint(-128 - min / scale)``."""
    if symmetric:
        scale = storage_scale(w.abs().amax(dim=-1) / 127.0, dtype)
        return scale, torch.zeros_like(scale)
    lo = w.amin(dim=-1).clamp_max(0.0)
    hi = w.amax(dim=-1).clamp_min(0.0)
    scale = storage_scale((hi - lo) / 255.0, dtype)
    offset = torch.round(-128.0 - lo / scale.to(torch.float32)).clamp(-128, 127).to(dtype)
    return scale, offset


def quantize_weight(
    weight: torch.Tensor,
    *,
    group_size: int = 0,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Min-max int8 quantization of a linear weight, per output channel or per group.

    weight: (n, k) float. group_size: 0 (per-channel) or g dividing k (per-group along k).
    symmetric: ``scale = absmax / 127``, offset 0; else ``scale = (max - min) / 255`` over the
    range widened to include 0 and ``offset = rint(-128 - min / scale)`` (so min -> -128,
    max -> 127). scale_dtype: storage dtype of scale/offset (default: weight's dtype).
    Every element satisfies ``|w - (q - offset) * scale| <= scale / 2`` (float32 math).
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight: must be a 2-D float tensor, got {weight.dtype} {list(weight.shape)}"
        )
    dt = scale_dtype or weight.dtype
    n, k = weight.shape
    w = _grouped(weight.to(torch.float32), group_size)  # (n, G, g)
    scale, offset = weight_qparams(w, symmetric, dt)
    G = w.shape[1]
    flat = w.reshape(n * G, -1)
    q = quantize(flat, scale.reshape(-1), offset.reshape(-1), axis=0)
    if dt == torch.float16:  # W8A16 kernels round (q - offset) * scale to fp16: it must fit
        top = (q.float() - offset.reshape(-1, 1).float()).abs().amax(-1) * scale.reshape(-1).float()
        if not bool(torch.isfinite(scale).all()) or bool((top > torch.finfo(dt).max).any()):
            raise ValueError(
                "weight: fp16 scales overflow: (q - offset) * scale exceeds 65504 (fp16 max) in "
                f"{int((top > torch.finfo(dt).max).sum())} rows/groups; use bfloat16 scales"
            )
    return QuantizedWeight(q.reshape(n, k), scale, offset, group_size)


def dequantize_weight(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None = None,
    group_size: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reconstruct float weights ``(q - offset) * scale`` (msmodelslim sign), in float32 math.

    qweight: (n, k) int8; scale / offset: (n, 1), (n,), or (n, k // g) for per-group
    (any float dtype; offset None = 0). Returns (n, k) in ``dtype``.
    """
    n, k = qweight.shape
    q = _grouped(qweight.to(torch.float32), group_size)  # (n, G, g)
    G = q.shape[1]
    s = scale.to(torch.float32).reshape(n, G, 1)
    w = q if offset is None else q - offset.to(torch.float32).reshape(n, G, 1)
    return (w * s).reshape(n, k).to(dtype)


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


@dataclass
class ActivationRange:
    """Observed input range of one layer: floats ``lo <= 0 <= hi`` after widening."""

    lo: float
    hi: float


class MinMaxObserver:
    """Running min / max of a layer's inputs. ``update(x)`` with any float tensor."""

    def __init__(self) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        xf = x.detach().to(torch.float32)
        self.lo = min(self.lo, float(xf.min()))
        self.hi = max(self.hi, float(xf.max()))

    def range(self) -> ActivationRange:
        if self.lo > self.hi:
            raise ValueError("observer saw no data")
        return ActivationRange(self.lo, self.hi)


class PercentileObserver:
    """Outlier-robust range: the ``percentile`` / ``100 - percentile`` quantiles of the values
    seen (default 99.99 / 0.01), from a seeded random subsample of at most ``max_samples``."""

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 22, seed: int = 0):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile: must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self._values = torch.empty(0, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        v = torch.cat([self._values, x.detach().to(torch.float32).reshape(-1)])
        if v.numel() > self.max_samples:
            idx = torch.randperm(v.numel(), generator=self._gen)[: self.max_samples]
            v = v[idx]
        self._values = v

    def range(self) -> ActivationRange:
        if self._values.numel() == 0:
            raise ValueError("observer saw no data")
        p = self.percentile / 100.0
        q = torch.quantile(self._values, torch.tensor([1.0 - p, p]))
        return ActivationRange(float(q[0]), float(q[1]))


class MSEObserver(PercentileObserver):
    """Clipped range of least int8 error: among ``steps`` ranges ``c * [min, max]`` (c from
    ``min_ratio`` to 1) the one whose asymmetric int8 fake-quantization of the (subsampled)
    values has the smallest mean squared error (a histogram / MSE search as msmodelslim's
    activation calibration; outliers are clipped only when that pays off)."""

    def __init__(self, steps: int = 50, min_ratio: float = 0.2, max_samples: int = 1 << 20):
        super().__init__(100.0, max_samples)
        self.steps, self.min_ratio = steps, min_ratio

    def range(self) -> ActivationRange:
        v = self._values
        if v.numel() == 0:
            raise ValueError("observer saw no data")
        lo0, hi0 = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
        best, best_err = ActivationRange(lo0, hi0), float("inf")
        for c in torch.linspace(self.min_ratio, 1.0, self.steps).tolist():
            lo, hi = lo0 * c, hi0 * c
            scale = max(hi - lo, 1e-30) / 255.0
            off = round(-128.0 - lo / scale)
            q = torch.clamp(torch.round(v / scale + off), -128, 127)
            err = float(((q - off) * scale - v).square().mean())
            if err < best_err:
                best, best_err = ActivationRange(lo, hi), err
        return best


def activation_qparams(
    rng: ActivationRange, dtype: torch.dtype, *, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor static activation quantization parameters from an observed range.

    Asymmetric (msmodelslim's default): range widened to include 0, ``input_scale = (hi - lo) /
    255``, ``input_offset = rint(-128 - lo / input_scale)``. Symmetric: ``input_scale = absmax /
    127``, offset 0. Returns (input_scale [1], input_offset [1]), both in ``dtype``.
    """
    lo, hi = min(rng.lo, 0.0), max(rng.hi, 0.0)
    if symmetric:
        scale = storage_scale(torch.tensor([max(-lo, hi) / 127.0]), dtype)
        return scale, torch.zeros(1, dtype=dtype)
    scale = storage_scale(torch.tensor([(hi - lo) / 255.0]), dtype)
    offset = torch.round(-128.0 - lo / scale.to(torch.float32)).clamp(-128, 127)
    return scale, offset.to(dtype)


def quantize_activation(
    x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor
) -> torch.Tensor:
    """Static per-tensor quantization ``rint(x / input_scale + input_offset)`` -> int8, x's shape
    (``ascend_ops.kernels.quantize``, npu_quantize's div_mode)."""
    return quantize(x, input_scale.reshape(1), input_offset.reshape(1).to(torch.float32), axis=-1)


def dynamic_quant_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization: (int8 of x's shape, float32 scale x.shape[:-1])
    (``ascend_ops.kernels.dynamic_quant``)."""
    return dynamic_quant(x)


def compute_deq_scale(input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``input_scale * weight_scale`` in float32: [1] x [n, 1] | [n] -> [n] float32."""
    return (input_scale.to(torch.float32).reshape(()) * weight_scale.to(torch.float32)).reshape(-1)


def compute_quant_bias(
    bias: torch.Tensor | None,
    deq_scale: torch.Tensor,
    qweight: torch.Tensor,
    input_offset: torch.Tensor,
) -> torch.Tensor:
    """int32 [n] ``rint(bias / deq_scale) - input_offset * sum_k(qweight)``.

    bias: [n] float or None (zero); deq_scale: [n] float32 (or int64 bits); qweight: (n, k)
    int8; input_offset: [1]. Raises ValueError if a value does not fit int32.
    """
    deq = deq_scale_to_float32(deq_scale).to(torch.float64)
    off = float(input_offset.reshape(()).to(torch.float64))
    row_sum = qweight.to(torch.int64).sum(dim=1).to(torch.float64)
    folded = -off * row_sum
    if bias is not None:
        folded = torch.round(bias.to(torch.float64) / deq) + folded
    lim = 2.0**31
    if bool((folded >= lim).any() or (folded < -lim).any()):
        raise ValueError("quant_bias does not fit in int32 (bias too large for its deq_scale)")
    return folded.to(torch.int32)


# --------------------------------------------------------------------------------------------
# One linear layer <-> its checkpoint tensors
# --------------------------------------------------------------------------------------------


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: Scheme,
    *,
    model_dtype: torch.dtype | None = None,
    act_range: ActivationRange | None = None,
    act_symmetric: bool = False,
    qweight: QuantizedWeight | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize one ``nn.Linear`` into its checkpoint tensors (names per
    ``scheme.tensor_specs``; the keys are the suffixes after the module name).

    weight: (n, k) float; bias: (n,) float or None; model_dtype: dtype of the float tensors and
    scales (default: weight's). Static W8A8 needs ``act_range`` (observed input range).
    qweight: the int8 weight already rounded by another algorithm (``quant.gptq``) with the
    scheme's granularity and scale dtype; default min-max ``quantize_weight``.
    """
    dt = model_dtype or weight.dtype
    n, k = weight.shape
    out = scheme.quantize(weight, bias, dt, act_range, act_symmetric, qweight)
    for name, spec in scheme.spec_map(n, k, bias is not None, dt).items():
        if name in out:
            spec.check(out[name].shape, out[name].dtype)
    return out


def dequantize_linear(
    tensors: dict[str, torch.Tensor], scheme: Scheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 (weight (n, k), bias (n,) or None) equivalent to a layer's checkpoint tensors.

    For static W8A8 the returned bias is the float bias folded in quant_bias
    (``(quant_bias + input_offset * sum_k Wq) * deq_scale``), None if that is all zero.
    """
    return scheme.dequantize(tensors)
