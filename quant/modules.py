"""Reference quantized linear module and the torchao-style ``quantize_(model, config)``.

``QuantLinear`` holds exactly the checkpoint tensors of its scheme (as buffers named like the
checkpoint suffixes, so ``state_dict()`` of a converted model matches a quantized checkpoint)
and computes its forward with the ``ascend_ops.kernels`` helper kernels, i.e. the same math the
NPU runs. It is meant for measuring quality on CPU, not for tensor parallelism.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from quant.algorithms import ActivationRange, quantize_linear
from quant.schemes import Scheme

__all__ = ["DEFAULT_SKIP_PATTERNS", "QuantLinear", "is_skipped", "quantize_"]

#: Module-name regexes (``re.search``, case-insensitive) kept in float by default: the LM head,
#: embeddings and norms. Non-2-D tensors are never quantized.
DEFAULT_SKIP_PATTERNS: tuple[str, ...] = (
    r"(^|\.)lm_head$",
    r"embed",
    r"norm",
    r"(^|\.)wte$",
    r"(^|\.)wpe$",
)


def is_skipped(module_name: str, patterns: Iterable[str] = ()) -> bool:
    """True if ``module_name`` matches a default skip pattern or one of ``patterns``."""
    return any(
        re.search(p, module_name, flags=re.IGNORECASE) for p in (*DEFAULT_SKIP_PATTERNS, *patterns)
    )


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W (n, k) stored per ``scheme`` (see ``quant.schemes``).

    Input x: (..., k) float (bf16 / fp16 / fp32). Output: (..., n) in x's dtype.
    """

    def __init__(self, scheme: Scheme, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.scheme = scheme
        n, k = tensors["weight"].shape
        self.in_features, self.out_features = int(k), int(n)
        specs = scheme.spec_map(n, k, "bias" in tensors, self._model_dtype(tensors))
        for name, spec in specs.items():
            if name not in tensors:
                if spec.required:
                    raise ValueError(f"{name}: missing for a {scheme.name} layer")
                continue
            spec.check(tensors[name].shape, tensors[name].dtype)
            self.register_buffer(name, tensors[name])

    @staticmethod
    def _model_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
        for key in ("input_scale", "weight_scale", "weight", "bias"):
            t = tensors.get(key)
            if t is not None and t.is_floating_point():
                return t.dtype
        return torch.float16 if tensors["deq_scale"].dtype == torch.int64 else torch.bfloat16

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: Scheme,
        *,
        act_range: ActivationRange | None = None,
        model_dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """Quantize an ``nn.Linear`` (static W8A8 needs ``act_range``)."""
        tensors = quantize_linear(
            linear.weight.detach(),
            None if linear.bias is None else linear.bias.detach(),
            scheme,
            model_dtype=model_dtype or linear.weight.dtype,
            act_range=act_range,
        )
        return cls(scheme, tensors)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by checkpoint suffix."""
        return dict(self.named_buffers(recurse=False))

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 (weight (n, k), bias (n,) or None) this layer represents."""
        return self.scheme.dequantize(self.checkpoint_tensors())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.scheme}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., k) -> (..., n): the scheme's formula, as the parallel layers run it."""
        args = self.scheme.kernel_args(self.checkpoint_tensors(), x.dtype)
        bias = getattr(self, "bias", None)
        return self.scheme.linear(x, self.weight.t(), args, bias)


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and not is_skipped(fqn)


def quantize_(
    model: nn.Module,
    config: Scheme,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibration: Mapping[str, ActivationRange] | None = None,
    model_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace, in place, every selected ``nn.Linear`` of ``model`` by a ``QuantLinear``.

    filter_fn(module, fqn): which modules to convert (default: every nn.Linear whose name does
    not match ``DEFAULT_SKIP_PATTERNS``). Static W8A8 needs ``calibration``: fqn -> input range
    (see ``quant.calibration.observe_ranges``); a selected module without one raises.
    Returns ``model``.
    """
    if filter_fn is None:
        filter_fn = _default_filter
    static = config.needs_calibration
    targets = [
        (fqn, m)
        for fqn, m in model.named_modules()
        if isinstance(m, nn.Linear) and filter_fn(m, fqn)
    ]
    if static:
        missing = [fqn for fqn, _ in targets if fqn not in (calibration or {})]
        if missing:
            raise ValueError(
                f"static W8A8 needs calibration for: {', '.join(missing[:8])}"
                + (" ..." if len(missing) > 8 else "")
            )
    for fqn, m in targets:
        q = QuantLinear.from_linear(
            m,
            config,
            act_range=(calibration or {}).get(fqn) if static else None,
            model_dtype=model_dtype,
        )
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)
    return model
