"""Collectives the layers need besides the fused op: all-gather along the last dim (column
output gather) and the local split of a replicated input. The all-reduce is ascend_ops'."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ascend_ops import resolve_hcom
from tp_layers.context import TPContext

__all__ = ["gather_last_dim", "split_last_dim"]


def _gather_impl(x: torch.Tensor, hcom: str) -> torch.Tensor:
    group = resolve_hcom(hcom)
    if group is None:
        return x.clone()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


@torch.library.custom_op("tp_layers::all_gather_last_dim", mutates_args=())
def _gather_op(x: torch.Tensor, hcom: str, world_size: int) -> torch.Tensor:
    return _gather_impl(x, hcom)


@_gather_op.register_fake
def _gather_fake(x, hcom, world_size):
    return x.new_empty((*x.shape[:-1], x.shape[-1] * world_size))


def gather_last_dim(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """(..., n_local) on every rank -> (..., n_local * world_size), rank order."""
    if tp.size == 1:
        return x
    if torch.compiler.is_compiling():
        return _gather_op(x, tp.hcom, tp.size)
    return _gather_impl(x, tp.hcom)


def split_last_dim(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """This rank's contiguous chunk of the last dim of a replicated input."""
    if tp.size == 1:
        return x
    k = x.shape[-1]
    if k % tp.size:
        raise ValueError(f"x: last dim {k} does not divide by the TP size {tp.size}")
    step = k // tp.size
    return x[..., tp.rank * step : (tp.rank + 1) * step].contiguous()
