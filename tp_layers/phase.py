"""Prefill / decode phase: the row-parallel forward calls the fused op in prefill and a local
matmul + separate all-reduce in decode (CONTRACT.md C10: "full" uses MC2, incremental does not).

The phase comes from an explicit context the caller sets::

    with tp_layers.phase("prefill"):
        model(input_ids)

Without one, it is inferred from the input, in this order:

1. (b, s, k) with s > 1 (a prompt) -> prefill;
2. a token count set with ``set_prefill_threshold(t)`` -> prefill from t tokens, for every
   layer (the user's measured number replaces the kernel rule);
3. otherwise, for a layer whose per-rank weight (k, n) is known, the Atlas A2 kernel's own
   tiling rule (``ascend_ops.contract.kernel_splits_m``): prefill exactly when the fused kernel
   cuts the m tokens into pipelined chunks. Below that it runs the matmul and the all-reduce
   one after the other, so fusing gains nothing;
4. without the layer's shape, ``DEFAULT_PREFILL_THRESHOLD`` tokens (768: the kernel never splits
   fewer rows than twice its 384-row minimum tile unless the layer is large and balanced).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import torch

from ascend_ops.contract import NO_SPLIT_BELOW_ROWS, kernel_splits_m

__all__ = [
    "Phase",
    "current_phase",
    "infer_phase",
    "phase",
    "prefill_threshold",
    "set_prefill_threshold",
]


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


DEFAULT_PREFILL_THRESHOLD = NO_SPLIT_BELOW_ROWS

# Plain module globals (not ContextVars) so torch.compile guards on them instead of breaking.
# threshold None: follow the kernel's tiling rule per layer shape.
_state: dict = {"phase": None, "threshold": None}


@contextlib.contextmanager
def phase(name: str | Phase | None) -> Iterator[None]:
    """Set the phase ("prefill" / "decode") for the block; None restores inference."""
    prev = _state["phase"]
    _state["phase"] = None if name is None else Phase(name if isinstance(name, str) else name.value)
    try:
        yield
    finally:
        _state["phase"] = prev


def current_phase() -> Phase | None:
    """The phase set by the innermost ``phase(...)`` block, or None."""
    return _state["phase"]


def prefill_threshold() -> int:
    """The token count from which an input of unknown layer shape counts as prefill: the one
    set with set_prefill_threshold, else DEFAULT_PREFILL_THRESHOLD."""
    t = _state["threshold"]
    return DEFAULT_PREFILL_THRESHOLD if t is None else t


def set_prefill_threshold(tokens: int | None) -> None:
    """Token count at or above which an input without an explicit phase counts as prefill, for
    every layer; None restores the kernel's per-layer tiling rule."""
    if tokens is not None and (
        isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1
    ):
        raise ValueError(f"tokens: must be a positive int or None, got {tokens!r}")
    _state["threshold"] = tokens


def infer_phase(x: torch.Tensor, n: int | None = None) -> Phase:
    """The phase of a row-parallel call (see the module docstring for the order of rules).

    x: (m, k) or (b, s, k), k the per-rank input size; n: the layer's output size, when known.
    """
    explicit = _state["phase"]
    if explicit is not None:
        return explicit
    if x.dim() >= 3 and x.shape[-2] > 1:
        return Phase.PREFILL
    tokens = x.numel() // x.shape[-1]
    if _state["threshold"] is None and n is not None:
        out_bytes = 4 if x.dtype == torch.float32 else 2
        split = kernel_splits_m(tokens, n, x.shape[-1], out_bytes)
        return Phase.PREFILL if split else Phase.DECODE
    return Phase.PREFILL if tokens >= prefill_threshold() else Phase.DECODE
