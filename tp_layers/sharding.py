"""The sharding rules: which checkpoint dim each kind of tensor is split along per layer style
(None = replicated), the one segment-wise sharding function (MLX ``_shard(..., segments)``
style) that serves column, merged, QKV and head-replicated layers alike, and the helpers that
take a rank's slice from a full tensor, a lazy safetensors slice (``safe_open(...).get_slice``)
or a :class:`quant.checkpoint.StoredTensor` (positional reads straight into the destination)
without reading the rest.

Checkpoint layout is (n, k) for weights (out_features, in_features), as in nn.Linear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quant.checkpoint import StoredTensor, dtype_from_safetensors

__all__ = ["SHARD_DIM", "Segment", "full_shape", "read_range", "shard_ranges", "source_dtype"]

# (parallel style, tensor kind (TensorSpec.kind)) -> checkpoint dim split across ranks.
SHARD_DIM: dict[tuple[str, str], int | None] = {
    ("row", "weight"): 1,  # (n, k): along k
    ("row", "group"): 1,  # per-group scale (n, k/g): with the weight, whole groups per rank
    ("row", "channel"): None,  # per-channel scale (n, 1) / (n,): every rank needs all n
    ("row", "tensor"): None,  # per-tensor [1]
    ("row", "bias"): None,  # added once (rank 0 / after the reduce)
    ("column", "weight"): 0,  # (n, k): along n
    ("column", "group"): 0,
    ("column", "channel"): 0,
    ("column", "tensor"): None,
    ("column", "bias"): 0,
}


@dataclass(frozen=True)
class Segment:
    """One part of a sharded dim: ``size`` rows in the full tensor, of which this rank keeps
    ``local`` rows starting at ``start`` (relative to the segment)."""

    size: int
    local: int
    start: int

    @classmethod
    def even(cls, size: int, rank: int, world: int, replicas: int = 1) -> Segment:
        """Contiguous equal parts; with ``replicas`` > 1 consecutive ranks share one part."""
        parts = world // replicas
        local = size // parts
        return cls(size, local, (rank // replicas) * local)


def shard_ranges(segments: Sequence[Segment], index: int | None) -> list[tuple[int, int, int]]:
    """(source start, length, destination start) of the rows this rank keeps: from a tensor
    holding every segment concatenated (``index`` None), or from segment ``index`` alone."""
    out, src, dst = [], 0, 0
    for i, s in enumerate(segments):
        if index is None:
            out.append((src + s.start, s.local, dst))
        elif i == index:
            out.append((s.start, s.local, dst))
        src += s.size
        dst += s.local
    return out


def full_shape(loaded: Any) -> tuple[int, ...]:
    """Shape of a torch tensor or of a lazy safetensors slice."""
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def source_dtype(loaded: Any) -> torch.dtype:
    """Stored dtype of a torch tensor, a StoredTensor or a lazy safetensors slice (no read)."""
    if isinstance(loaded, (torch.Tensor, StoredTensor)):
        return loaded.dtype
    return dtype_from_safetensors(loaded.get_dtype())


def read_range(
    loaded: Any, dim: int | None, start: int, length: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``loaded[..., start:start+length, ...]`` along ``dim`` (everything when dim is None).

    For a safetensors slice or a StoredTensor only the requested rows/columns are read from
    disk. With ``out`` (same number of elements; cast to its dtype) the range is written there
    and ``out`` returned: a StoredTensor reads straight into it, without an intermediate tensor.
    """
    if isinstance(loaded, StoredTensor):
        return loaded.read(dim, start, length, out=out)
    shape = full_shape(loaded)
    if dim is None:
        part = (
            loaded
            if isinstance(loaded, torch.Tensor)
            else loaded[tuple(slice(None) for _ in shape)]
        )
    else:
        idx = [slice(None)] * len(shape)
        idx[dim] = slice(start, start + length)
        part = loaded[tuple(idx)]
    if out is None:
        return part
    out.copy_(part.reshape(out.shape))
    return out
