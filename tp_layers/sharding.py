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

__all__ = [
    "SHARD_DIM",
    "Padded",
    "Segment",
    "SourcePadding",
    "full_shape",
    "read_range",
    "shard_ranges",
    "source_dtype",
]

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


class Padded:
    """A checkpoint tensor (torch tensor, lazy safetensors slice or StoredTensor) seen padded
    along ``dim`` up to ``length``: zeros, or with ``edge`` copies of its last entry (scales:
    any finite non-zero value serves all-zero padded weights). A read takes only the stored
    rows of its range from the source, straight into the destination where the ranks match."""

    def __init__(self, loaded: Any, dim: int, length: int, edge: bool) -> None:
        self.loaded, self.dim, self.length, self.edge = loaded, dim, length, edge
        self.stored = full_shape(loaded)[dim]
        self.dtype = source_dtype(loaded)

    def get_shape(self) -> list[int]:
        shape = list(full_shape(self.loaded))
        shape[self.dim] = self.length
        return shape

    def read(
        self, dim: int | None, start: int, length: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``read_range`` of the padded tensor."""
        if dim != self.dim:  # the whole padded dim: read, then pad
            part = read_range(self.loaded, dim, start, length)
            shape, have = list(part.shape), part.shape[self.dim]
            shape[self.dim] = self.length
            buf = part.new_empty(shape)
            buf.narrow(self.dim, 0, have).copy_(part)
            self._fill(
                buf.narrow(self.dim, have, self.length - have), part.narrow(self.dim, have - 1, 1)
            )
            return buf if out is None else out.copy_(buf.reshape(out.shape))
        keep = max(0, min(start + length, self.stored) - start)
        shape = self.get_shape()
        shape[dim] = length
        direct = out is not None and out.dim() == len(shape)
        buf = out if direct else torch.empty(shape, dtype=self.dtype)
        if keep:
            read_range(self.loaded, dim, start, keep, out=buf.narrow(dim, 0, keep))
        rest = buf.narrow(dim, keep, length - keep)
        if rest.numel():
            edge = read_range(self.loaded, dim, self.stored - 1, 1) if self.edge else None
            self._fill(rest, edge)
        return buf if out is None or direct else out.copy_(buf.reshape(out.shape))

    def _fill(self, rest: torch.Tensor, last: torch.Tensor | None) -> None:
        """The padding entries: ``last`` repeated (``edge``) or zeros."""
        if self.edge and last is not None and rest.numel():
            rest.copy_(last.expand_as(rest))
        else:
            rest.zero_()


@dataclass(frozen=True)
class SourcePadding:
    """A module holding ``padded`` entries along ``dim`` for every ``stored`` ones of its
    checkpoint (zero heads, padded vocab rows). Every checkpoint tensor that runs along
    ``dim`` in that proportion is read padded (:class:`Padded`); one already padded, or not
    running along ``dim`` (per-tensor values, a row layer's per-channel scales), as stored."""

    dim: int
    stored: int
    padded: int

    def apply(self, loaded: Any, want: tuple[int, ...], edge: bool) -> Any:
        """``loaded`` seen with the expected full shape ``want``, if it is stored unpadded."""
        shape, d = full_shape(loaded), self.dim
        if len(shape) <= d or len(want) <= d or shape[d] == want[d] or shape[d] < 2:
            return loaded
        if shape[d] * self.padded != want[d] * self.stored:  # not in proportion: let it fail
            return loaded
        return Padded(loaded, d, want[d], edge)


def full_shape(loaded: Any) -> tuple[int, ...]:
    """Shape of a torch tensor or of a lazy safetensors slice."""
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def source_dtype(loaded: Any) -> torch.dtype:
    """Stored dtype of a torch tensor, a StoredTensor or a lazy safetensors slice (no read)."""
    if isinstance(loaded, (torch.Tensor, StoredTensor, Padded)):
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
    if isinstance(loaded, (StoredTensor, Padded)):
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
