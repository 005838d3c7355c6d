"""Quantization choices of parallelize / load_pretrained: which scheme a layer gets, its
calibrated input range, and the checkpoint tensors of a float layer under its scheme."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping

import torch

from quant.algorithms import ActivationRange, MinMaxObserver, quantize_linear
from quant.calibration import Calibration
from quant.schemes import Scheme

__all__ = ["CalibrationSpec", "QuantSpec", "layer_tensors", "quant_resolver"]

QuantSpec = Scheme | Mapping[str, Scheme | None] | Callable[[str], Scheme | None] | None
CalibrationSpec = Calibration | Mapping[str, ActivationRange | torch.Tensor] | None


def quant_resolver(quant: QuantSpec) -> tuple[Callable[[str], Scheme | None], bool]:
    """(name -> scheme, whether layers outside the plan are asked too)."""
    if quant is None:
        return (lambda _name: None), False
    if isinstance(quant, Scheme):
        return (lambda _name: quant), False
    if isinstance(quant, Mapping):
        items = list(quant.items())
        for pat, s in items:
            if s is not None and not isinstance(s, Scheme):
                raise TypeError(f"quant[{pat!r}]: must be a Scheme or None, got {type(s).__name__}")

        def by_glob(name: str) -> Scheme | None:
            for pat, s in items:
                if fnmatch.fnmatchcase(name, pat):
                    return s
            return None

        return by_glob, True
    if callable(quant):

        def checked(name: str) -> Scheme | None:
            s = quant(name)
            if s is not None and not isinstance(s, Scheme):
                raise TypeError(f"quant({name!r}): must return a Scheme or None, got {s!r}")
            return s

        return checked, True
    raise TypeError(
        f"quant: expected None, a Scheme, a dict of glob -> Scheme or a callable, got {quant!r}"
    )


def _act_range(calibration: CalibrationSpec, name: str) -> ActivationRange:
    hint = (
        f"{name}: static W8A8 needs the layer's calibrated input range; pass calibration="
        "{name: ActivationRange | activations (rows, k)} (record them with "
        "quant.collect_activations on the float model) or use W8A8(dynamic=True)"
    )
    if calibration is None:
        raise ValueError(hint)
    if isinstance(calibration, Calibration):
        if name not in calibration.modules():
            raise ValueError(hint)
        return calibration.range_of(name)
    value = calibration.get(name)
    if value is None:
        raise ValueError(hint)
    if isinstance(value, ActivationRange):
        return value
    obs = MinMaxObserver()
    obs.update(value)
    return obs.range()


def layer_tensors(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: Scheme | None,
    dtype: torch.dtype,
    calibration: CalibrationSpec,
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one float layer under ``scheme`` (quantized if it says so)."""
    if scheme is None or not scheme.is_quantized:
        out = {"weight": weight.detach()}
        if bias is not None:
            out["bias"] = bias.detach()
        return out
    act = None
    if scheme.needs_calibration:
        act = _act_range(calibration, name)
    return quantize_linear(
        weight.detach(),
        None if bias is None else bias.detach(),
        scheme,
        model_dtype=dtype,
        act_range=act,
    )
