"""Instrumentation: how many layer forwards took each path since the last reset, so examples /
tests can show which one ran. RowParallelLinear: "fused" (prefill: one mm_all_reduce_base call),
"unfused" (decode: local matmul, then all_reduce), "local" (TP 1 or reduce_results=False: no
communication). Sequence parallel (tp_layers.sequence): column layers "ag_fused" (one
all_gather_base_mm) / "ag_unfused" (all_gather_dim0, then the scheme's matmul), row layers
"rs_fused" (one mm_reduce_scatter_base) / "rs_unfused" (matmul, then reduce_scatter_dim0), and
"local" at TP 1. Not updated while torch.compile traces (no graph side effects)."""

from __future__ import annotations

import torch

__all__ = ["count_path", "path_counts", "reset_path_counts"]

_BASE = ("fused", "unfused", "local")
_COUNTS: dict[str, int] = dict.fromkeys(_BASE, 0)


def count_path(path: str) -> str:
    """Count one forward on ``path``; returns ``path``."""
    if not torch.compiler.is_compiling():
        _COUNTS[path] = _COUNTS.get(path, 0) + 1
    return path


def path_counts() -> dict[str, int]:
    """Copy of the path counters: path name (see the module docstring) -> calls. The three
    RowParallelLinear paths are always present, the sequence-parallel ones once they ran."""
    return dict(_COUNTS)


def reset_path_counts() -> None:
    """Zero the path counters."""
    _COUNTS.clear()
    _COUNTS.update(dict.fromkeys(_BASE, 0))
