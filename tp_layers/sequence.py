"""Sequence parallelism's token split: which rows of an activation each rank holds.

A token-sharded activation is split along dim 0 (its token dim: ``(m, k)`` rows, or
Megatron's ``[s, b, h]`` sequence dim). The one convention, used by every layer and
integration: with ``c = ceil(m / world_size)``, rank r holds rows ``[r * c, min((r + 1) * c, m))``
(in rank order; the last ranks hold fewer rows, possibly none when m < world_size). The layers
pad a shard to ``c`` rows for the collectives and drop the padding again, so any m works;
``num_tokens`` (the full m) tells a column layer how long the gathered result is when m does
not divide by the world size.

    x_local = tl.split_tokens(x, tp)                 # this rank's rows of a replicated x
    y = col(x_local, num_tokens=x.shape[0])          # all-gather + matmul: (m, n / tp)
    z = row(y)                                       # matmul + reduce-scatter: x_local's rows
    full = tl.gather_tokens(z, tp, x.shape[0])       # (m, n) on every rank
"""

from __future__ import annotations

import torch

import ascend_ops
from tp_layers.context import TPContext, get_tp

__all__ = [
    "gather_tokens",
    "pad_tokens",
    "reduce_scatter_tokens",
    "shard_rows",
    "split_tokens",
    "token_shard",
]


def shard_rows(num_tokens: int, world_size: int) -> int:
    """Rows per rank, c = ceil(num_tokens / world_size): what the collectives pad a shard to."""
    return -(-num_tokens // world_size)


def token_shard(num_tokens: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, length) of rank ``rank``'s rows out of ``num_tokens`` (ceil-divided chunks)."""
    chunk = shard_rows(num_tokens, world_size)
    start = min(rank * chunk, num_tokens)
    return start, min(chunk, num_tokens - start)


def pad_tokens(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` (m, ...) with zero rows appended up to ``rows`` along dim 0 (x itself if m = rows)."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def split_tokens(x: torch.Tensor, tp: TPContext | None = None) -> torch.Tensor:
    """This rank's rows of a replicated activation ``x`` (m, ...): (length, ...) (a copy)."""
    tp = tp if tp is not None else get_tp()
    start, length = token_shard(x.shape[0], tp.size, tp.rank)
    return x.narrow(0, start, length).contiguous()


def num_tokens_of(x: torch.Tensor, tp: TPContext, num_tokens: int | None, where: str) -> int:
    """The full token count m of the shard ``x`` (default: shards of equal length, m = rows *
    world size), checked against this rank's share of it."""
    rows = x.shape[0]
    m = rows * tp.size if num_tokens is None else num_tokens
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"{where}: num_tokens must be an int >= 0, got {num_tokens!r}")
    want = token_shard(m, tp.size, tp.rank)[1]
    if rows != want:
        raise ValueError(
            f"{where}: input has {rows} tokens (dim 0) on rank {tp.rank}, but rank {tp.rank}'s "
            f"shard of {m} tokens over TP {tp.size} has {want} (tp_layers.split_tokens); pass "
            "num_tokens= the full token count"
        )
    return m


def gather_tokens(
    x: torch.Tensor, tp: TPContext | None = None, num_tokens: int | None = None
) -> torch.Tensor:
    """Inverse of ``split_tokens``: every rank's rows, (m, ...), on every rank. ``num_tokens``:
    the full m (default: this rank's rows x world size)."""
    tp = tp if tp is not None else get_tp()
    m = num_tokens_of(x, tp, num_tokens, "gather_tokens")
    if tp.size == 1:
        return x
    padded = pad_tokens(x, shard_rows(m, tp.size))
    return ascend_ops.all_gather_dim0(padded, tp.hcom).narrow(0, 0, m)


def reduce_scatter_tokens(x: torch.Tensor, tp: TPContext | None = None) -> torch.Tensor:
    """Sum of ``x`` (m, ...) over the TP group, this rank's rows of it (``token_shard``)."""
    tp = tp if tp is not None else get_tp()
    if tp.size == 1:
        return x
    m = x.shape[0]
    y = ascend_ops.reduce_scatter_dim0(pad_tokens(x, shard_rows(m, tp.size) * tp.size), tp.hcom)
    return y.narrow(0, 0, token_shard(m, tp.size, tp.rank)[1])
