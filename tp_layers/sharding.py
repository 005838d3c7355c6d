"""The sharding rules: one table saying, per layer kind and parameter kind, which checkpoint dim
is split across ranks (None = replicated), and the helpers that take a rank's slice from a full
tensor, a lazy safetensors slice (``safe_open(...).get_slice``) or a
:class:`quant.checkpoint.StoredTensor` (positional reads straight into the destination) without
reading the rest.

Checkpoint layout is (n, k) for weights (out_features, in_features), as in nn.Linear.
"""

from __future__ import annotations

from typing import Any

import torch

from quant.checkpoint import StoredTensor, dtype_from_safetensors

__all__ = ["SHARD_DIM", "full_shape", "param_kind", "read_range", "source_dtype"]

# (parallel style, parameter kind) -> checkpoint dim split across ranks, None = replicated.
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


def param_kind(name: str, shape: tuple[int, ...]) -> str:
    """Kind of a checkpoint tensor of a linear layer, from its name and full shape."""
    if name == "weight":
        return "weight"
    if name == "bias":
        return "bias"
    if len(shape) == 1 and shape[0] == 1:
        return "tensor"
    if len(shape) == 2 and shape[1] > 1:
        return "group"
    return "channel"


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
