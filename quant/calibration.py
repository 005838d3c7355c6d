"""Calibration data for static W8A8: collecting layer inputs and the calib file format.

Calib file (``--calib FILE``): one safetensors file (no pickle), any mix of, per module
``M`` (the linear layer's name, i.e. its weight name without ``.weight``):

- ``"M"``: float tensor (..., k) of sample inputs of that layer (rows are tokens). Gives the
  observers (min-max or percentile) their data, and the report its output error.
- ``"M.input_min"`` and ``"M.input_max"``: one-element float tensors, an already observed
  range (min-max only; no output error in the report).

or, alternatively, token ids to run through the float model (needs ``config.json`` in the
model directory and ``transformers``):

- ``"input_ids"``: int tensor (batch, seq); optional ``"attention_mask"`` of the same shape.
  The model is loaded with ``AutoModel`` (``AutoModelForCausalLM`` when the config names a
  causal-LM architecture) from the model directory, offline, and every nn.Linear's inputs are
  recorded.

``save_activations`` writes the first format; ``collect_activations`` records the inputs of an
in-memory model's linear layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quant.algorithms import ActivationRange, MinMaxObserver, PercentileObserver

__all__ = [
    "Calibration",
    "collect_activations",
    "load_calibration",
    "observe_ranges",
    "save_activations",
]


@dataclass
class Calibration:
    """Loaded calib data: ``activations`` (module -> (rows, k) float32) and/or ``ranges``
    (module -> observed range, from ``.input_min`` / ``.input_max`` entries)."""

    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    ranges: dict[str, ActivationRange] = field(default_factory=dict)

    def modules(self) -> set[str]:
        return set(self.activations) | set(self.ranges)

    def range_of(
        self, module: str, observer: str = "minmax", percentile: float = 99.99
    ) -> ActivationRange:
        """Input range of ``module``: stored range, else observed on its activations."""
        if module in self.ranges:
            return self.ranges[module]
        if module not in self.activations:
            raise KeyError(f"calibration has no data for {module!r}")
        obs = make_observer(observer, percentile)
        obs.update(self.activations[module])
        return obs.range()


def make_observer(kind: str, percentile: float = 99.99) -> MinMaxObserver | PercentileObserver:
    """``"minmax"`` or ``"percentile"``."""
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile)
    raise ValueError(f"observer: expected 'minmax' or 'percentile', got {kind!r}")


def collect_activations(
    model: nn.Module,
    run: Callable[[], Any],
    *,
    modules: Iterable[str] | None = None,
    max_rows: int = 4096,
) -> dict[str, torch.Tensor]:
    """Record the inputs of ``model``'s nn.Linear layers while ``run()`` executes.

    modules: fqns to record (default: every nn.Linear). Keeps at most ``max_rows`` rows per
    module (the first ones seen). Returns fqn -> (rows, k) float32 tensors.
    """
    wanted = None if modules is None else set(modules)
    store: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(fqn: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            have = counts.get(fqn, 0)
            if have >= max_rows:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])[: max_rows - have]
            store.setdefault(fqn, []).append(x.to(torch.float32).cpu())
            counts[fqn] = have + x.shape[0]

        return hook

    for fqn, m in model.named_modules():
        if isinstance(m, nn.Linear) and (wanted is None or fqn in wanted):
            hooks.append(m.register_forward_pre_hook(make_hook(fqn)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def observe_ranges(
    activations: Mapping[str, torch.Tensor], observer: str = "minmax", percentile: float = 99.99
) -> dict[str, ActivationRange]:
    """module -> input range of its recorded activations."""
    out = {}
    for name, x in activations.items():
        obs = make_observer(observer, percentile)
        obs.update(x)
        out[name] = obs.range()
    return out


def save_activations(path: str | os.PathLike[str], activations: Mapping[str, torch.Tensor]) -> None:
    """Write a calib file (format 1: module -> activations)."""
    save_file(
        {k: v.detach().to(torch.float32).contiguous() for k, v in activations.items()},
        str(path),
        metadata={"format": "quant-calib-activations"},
    )


def load_calibration(
    path: str | os.PathLike[str],
    *,
    model_dir: str | os.PathLike[str] | None = None,
    max_rows: int = 4096,
) -> Calibration:
    """Read a calib file (see the module docstring). A token-id file is run through the float
    model in ``model_dir``. Raises FileNotFoundError / ValueError with the reason."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calib file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"calib file {p} is not a readable safetensors file: {e}") from e
    if "input_ids" in tensors:
        return _run_token_ids(tensors, model_dir, max_rows)
    cal = Calibration()
    for k, v in tensors.items():
        if k.endswith(".input_min") or k.endswith(".input_max"):
            continue
        if not v.is_floating_point() or v.dim() < 1:
            raise ValueError(f"calib file {p}: {k!r} must be a float tensor (..., k)")
        cal.activations[k] = v.reshape(-1, v.shape[-1]).to(torch.float32)
    for k in tensors:
        if k.endswith(".input_min"):
            mod = k[: -len(".input_min")]
            hi = tensors.get(f"{mod}.input_max")
            if hi is None:
                raise ValueError(f"calib file {p}: {k!r} without {mod}.input_max")
            cal.ranges[mod] = ActivationRange(
                float(tensors[k].reshape(-1)[0]), float(hi.reshape(-1)[0])
            )
        elif k.endswith(".input_max") and f"{k[: -len('.input_max')]}.input_min" not in tensors:
            raise ValueError(f"calib file {p}: {k!r} without its .input_min")
    if not cal.modules():
        raise ValueError(f"calib file {p} holds no activations or ranges")
    return cal


def _run_token_ids(
    tensors: dict[str, torch.Tensor], model_dir: str | os.PathLike[str] | None, max_rows: int
) -> Calibration:
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        raise ValueError("a token-id calib file needs a model directory with config.json")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is an optional dependency
        raise ValueError("a token-id calib file needs the 'transformers' package") from e
    ids = tensors["input_ids"]
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
        raise ValueError("calib input_ids: must be an int tensor (batch, seq)")
    cfg = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    causal = any(a.endswith("ForCausalLM") for a in (cfg.architectures or []))
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = cls.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    model.eval()
    mask = tensors.get("attention_mask")
    acts = collect_activations(
        model, lambda: model(input_ids=ids.long(), attention_mask=mask), max_rows=max_rows
    )
    return Calibration(activations=acts)
