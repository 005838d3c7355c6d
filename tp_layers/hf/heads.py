"""Attention head math: an attention module's head counts, the local counts after sharding, and
zero-head padding (``pad_heads=True``) for head counts that do not split over the TP size.

Padding appends whole kv groups: kv heads ``kv -> kv'`` and q heads ``heads -> kv' * groups``
(the group size ``heads / kv`` is kept, so padded q head i still uses kv head ``i // groups``
and every padded q head belongs to a padded kv group). The padded q / k / v rows and o_proj
columns are zero: a padded head's values are zero, its output is zero, and o_proj ignores it,
so the model computes exactly what the unpadded one does. The padding is declared on the layer
(``source_padding``, tp_layers.sharding.SourcePadding): every checkpoint tensor running along the
padded dim is read padded in proportion (scales with their last entry, the rest with zeros).
"""

from __future__ import annotations

from torch import nn

__all__ = ["padded_head_counts"]

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
