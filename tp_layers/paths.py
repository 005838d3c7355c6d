"""Instrumentation: how many RowParallelLinear forwards took each path since the last reset, so
examples / tests can show which one ran: "fused" (prefill: one mm_all_reduce_base call),
"unfused" (decode: local matmul, then all_reduce), "local" (TP 1 or reduce_results=False: no
communication). Not updated while torch.compile traces (no graph side effects)."""

from __future__ import annotations

import torch

__all__ = ["count_path", "path_counts", "reset_path_counts"]

_COUNTS: dict[str, int] = {"fused": 0, "unfused": 0, "local": 0}


def count_path(path: str) -> str:
    """Count one forward on ``path``; returns ``path``."""
    if not torch.compiler.is_compiling():
        _COUNTS[path] = _COUNTS.get(path, 0) + 1
    return path


def path_counts() -> dict[str, int]:
    """Copy of the RowParallelLinear path counters: {"fused", "unfused", "local"} -> calls."""
    return dict(_COUNTS)


def reset_path_counts() -> None:
    """Zero the RowParallelLinear path counters."""
    for key in _COUNTS:
        _COUNTS[key] = 0
