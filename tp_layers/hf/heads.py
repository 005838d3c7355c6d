"""Attention head math: an attention module's head counts, the local counts after sharding, and
zero-head padding (``pad_heads=True``) for head counts that do not split over the TP size.

Padding appends whole kv groups: kv heads ``kv -> kv'`` and q heads ``heads -> kv' * groups``
(the group size ``heads / kv`` is kept, so padded q head i still uses kv head ``i // groups``
and every padded q head belongs to a padded kv group). The padded q / k / v rows and o_proj
columns are zero: a padded head's values are zero, its output is zero, and o_proj ignores it,
so the model computes exactly what the unpadded one does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tp_layers.sharding import full_shape

__all__ = ["HeadPadding", "padded_head_counts"]

KV_NAMES = {"k_proj", "v_proj", "key_proj", "value_proj", "key", "value"}
Q_NAMES = {"q_proj", "query_proj", "query"}
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads")
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")


def projection_slot(leaf: str) -> str | None:
    """ "q", "k" or "v" for an attention projection's attribute name, else None."""
    if leaf in Q_NAMES:
        return "q"
    if leaf in KV_NAMES:
        return "k" if leaf.startswith("k") else "v"
    return None


def int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def head_dim(attn: nn.Module) -> int | None:
    return int_attr(attn, ("head_dim", "head_size", "attention_head_size"))


def splits(heads: int, kv: int, tp: int) -> bool:
    """q heads split over tp, and kv heads split over or replicate on it."""
    return heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def padded_head_counts(heads: int, kv: int, tp: int) -> tuple[int, int]:
    """The smallest (heads', kv') >= (heads, kv) with heads' / kv' = heads / kv that splits."""
    if heads % kv:
        raise ValueError(f"{heads} q heads are not a multiple of {kv} kv heads")
    groups = heads // kv
    new_kv = kv
    while not splits(new_kv * groups, new_kv, tp):
        new_kv += 1
    return new_kv * groups, new_kv


def local_counts(heads: int, kv: int, tp: int) -> tuple[int, int]:
    """(q heads, kv heads) per rank; kv heads fewer than ranks are replicated (one per rank)."""
    return heads // tp, (kv // tp if kv % tp == 0 else 1)


def set_local_counts(attn: nn.Module, q_local: int, kv_local: int) -> None:
    """Set an attention module's head-count attributes to the local counts."""
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, q_local)
    for attr in KV_COUNT_ATTRS:
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, kv_local)
    if isinstance(getattr(attn, "num_key_value_groups", None), int):
        attn.num_key_value_groups = q_local // kv_local


class _PaddedSlice:
    """A lazy checkpoint tensor (safetensors slice / StoredTensor) seen padded along ``dim``
    up to ``length`` (``edge``: repeating the last stored entry, else zeros); a read takes only
    the stored rows of its range."""

    def __init__(self, loaded: Any, dim: int, length: int, edge: bool) -> None:
        self.loaded, self.dim, self.length, self.edge = loaded, dim, length, edge
        self.stored = full_shape(loaded)[dim]

    def get_shape(self) -> list[int]:
        shape = list(full_shape(self.loaded))
        shape[self.dim] = self.length
        return shape

    def get_dtype(self) -> str:
        return self.loaded.get_dtype()

    def __getitem__(self, idx: tuple[slice, ...]) -> torch.Tensor:
        idx = list(idx)
        sl = idx[self.dim]
        start, stop = sl.start or 0, self.length if sl.stop is None else sl.stop
        if self.edge and start >= self.stored:  # only padding: the edge entry, repeated
            idx[self.dim] = slice(self.stored - 1, self.stored)
            last = self.loaded[tuple(idx)]
            return last.expand(*[stop - start if d == self.dim else -1 for d in range(last.dim())])
        idx[self.dim] = slice(min(start, self.stored), min(stop, self.stored))
        return pad_dim(self.loaded[tuple(idx)], self.dim, stop - start, self.edge)


def pad_dim(t: torch.Tensor, dim: int, length: int, edge: bool = False) -> torch.Tensor:
    """``t`` padded along ``dim`` up to ``length``: zeros, or with ``edge`` copies of the last
    entry (scales: any finite non-zero value works for all-zero padded weights)."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    if edge:
        last = t.narrow(dim, t.shape[dim] - 1, 1)
        return torch.cat(
            [t, last.expand(*[missing if d == dim else -1 for d in range(t.dim())])], dim
        )
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim)


class HeadPadding:
    """A parallel layer's ``load_into`` for checkpoint tensors without the padded heads: the
    weight's ``dim`` grows from ``stored`` to ``padded``; every tensor of the layer that runs
    along that dim (the weight, per-row bias / scales / offsets / quant_bias of a column layer,
    per-group scales of a row layer) is padded in proportion: scales with their last entry,
    the rest with zeros, so the padded rows / columns are zero. Lazy for a safetensors slice
    / StoredTensor; a tensor already padded passes through."""

    def __init__(self, layer: nn.Module, dim: int, stored: int, padded: int) -> None:
        self.layer, self.dim, self.stored, self.padded = layer, dim, stored, padded

    def pad(self, name: str, loaded: Any) -> Any:
        shape = full_shape(loaded)
        want = self.layer.checkpoint_params()[name].spec.shape  # the padded full shape
        d = self.dim
        if len(shape) <= d or len(want) <= d or shape[d] == want[d] or shape[d] < 2:
            return loaded
        if shape[d] * self.padded != want[d] * self.stored:  # not in proportion: let it fail
            return loaded
        if isinstance(loaded, torch.Tensor):
            return pad_dim(loaded, d, want[d], "scale" in name)
        return _PaddedSlice(loaded, d, want[d], "scale" in name)

    def __call__(self, name: str, dest: torch.Tensor, loaded: Any, shard_id: Any = None) -> None:
        type(self.layer).load_into(self.layer, name, dest, self.pad(name, loaded), shard_id)

    @staticmethod
    def install(layer: nn.Module, dim: int, stored: int, padded: int) -> None:
        layer.load_into = HeadPadding(layer, dim, stored, padded)

    @staticmethod
    def pad_tensors(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full float tensors of ``layer`` padded (before quantizing them)."""
        hook = layer.__dict__.get("load_into")
        if not isinstance(hook, HeadPadding):
            return tensors
        return {n: hook.pad(n, t) for n, t in tensors.items()}
