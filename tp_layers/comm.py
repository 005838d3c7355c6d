"""The column output gather (ascend_ops.all_gather) and the local split of a replicated input."""

from __future__ import annotations

import torch

import ascend_ops
from tp_layers.context import TPContext

__all__ = ["gather_last_dim", "split_last_dim"]


def gather_last_dim(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """(..., n_local) on every rank -> (..., n_local * world_size), rank order."""
    if tp.size == 1:
        return x
    return ascend_ops.all_gather(x, tp.hcom)


def split_last_dim(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """This rank's contiguous chunk of the last dim of a replicated input."""
    if tp.size == 1:
        return x
    k = x.shape[-1]
    if k % tp.size:
        raise ValueError(f"x: last dim {k} does not divide by the TP size {tp.size}")
    step = k // tp.size
    return x[..., tp.rank * step : (tp.rank + 1) * step].contiguous()
