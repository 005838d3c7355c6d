"""Prefill / decode phase: the row-parallel forward calls the fused op in prefill and a local
matmul + separate all-reduce in decode (CONTRACT.md C10: "full" uses MC2, incremental does not).

The phase comes from an explicit context the caller sets::

    with tp_layers.phase("prefill"):
        model(input_ids)

Without one, it is inferred from the input: more than one token per sequence ((b, s, k) with
s > 1), or a token count at or above ``prefill_threshold()`` -> prefill, else decode.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import torch

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


# Token count at or above which an input without an explicit phase counts as prefill. Chosen with
# the overlap model of the fused kernel (bench/overlap.py, calibrated on the vendor's published
# cases): the MC2 kernel splits M into 128-row-aligned chunks, so below 256 rows it cannot
# pipeline at all (fused = serial matmul + all-reduce, no gain); from 256 rows the model predicts
# >= 5% for the 70B down_proj at TP 2/4, and most LLM-sized layers pay from 384-1024 rows. On the
# CPU portable backend both paths cost the same, so the Ascend figure decides.
DEFAULT_PREFILL_THRESHOLD = 256

# Plain module globals (not ContextVars) so torch.compile guards on them instead of breaking.
_state = {"phase": None, "threshold": DEFAULT_PREFILL_THRESHOLD}


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
    return _state["threshold"]


def set_prefill_threshold(tokens: int) -> None:
    """Token count at or above which an input without an explicit phase counts as prefill."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens: must be a positive int, got {tokens!r}")
    _state["threshold"] = tokens


def infer_phase(x: torch.Tensor) -> Phase:
    """The explicit phase if set, else PREFILL for (b, s>1, k) inputs or >= threshold tokens."""
    explicit = _state["phase"]
    if explicit is not None:
        return explicit
    if x.dim() >= 3 and x.shape[-2] > 1:
        return Phase.PREFILL
    tokens = x.numel() // x.shape[-1]
    return Phase.PREFILL if tokens >= _state["threshold"] else Phase.DECODE
