"""Vocab-parallel input embedding and lm_head (vLLM ``vocab_parallel_embedding.py`` / Megatron
``VocabParallelEmbedding`` semantics).

The vocab rows are padded to a multiple of ``tp * 64`` and split in equal contiguous ranges:
rank r holds padded rows ``[r * per, (r + 1) * per)``, ``per = padded / tp``. Padding rows are
zero and never produce output: the embedding gives zeros for ids outside a rank's valid range
and the all-reduce sums the ranks' lookups; the lm_head drops the padding logits after the
gather (or sets them to -inf in a local shard), so they are never returned or sampled. A tied
lm_head uses the embedding's sharded weight (one tensor).

Loading is the linear layers' (:class:`tp_layers.param.ShardedModule`): the weight is a
``ShardedParameter`` of the padded ``(padded, hidden)`` tensor split along dim 0, and a
checkpoint's unpadded ``(vocab, hidden)`` tensor is read through the module's
``source_padding`` (full tensor, lazy safetensors slice or ``quant.checkpoint.StoredTensor``,
each rank reading only its rows); ``load_weights`` / ``load_layer`` stage and agree across the
TP group before committing, ``weight_loader(param, loaded)`` loads in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

import ascend_ops
from quant.schemes import FP
from tp_layers.comm import gather_last_dim
from tp_layers.context import TPContext, get_tp
from tp_layers.param import ShardedModule
from tp_layers.sharding import Segment, SourcePadding

__all__ = ["DEFAULT_VOCAB_PADDING", "ParallelLMHead", "VocabParallelEmbedding", "pad_vocab_size"]

DEFAULT_VOCAB_PADDING = 64


def pad_vocab_size(vocab_size: int, tp_size: int, padding: int = DEFAULT_VOCAB_PADDING) -> int:
    """``vocab_size`` rounded up to a multiple of ``tp_size * padding``."""
    step = tp_size * padding
    return -(-vocab_size // step) * step


class _VocabMethod:
    """Kernel arguments of a vocab-parallel layer: its (rows, hidden) weight as loaded."""

    def process_weights_after_loading(
        self, layer: VocabParallelEmbedding, t: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        return {"weight": t["weight"]} if "weight" in t else {}


class VocabParallelEmbedding(ShardedModule):
    """``nn.Embedding(num_embeddings, embedding_dim)`` with the vocab rows sharded over TP.

    ids: any shape, integer -> (*ids.shape, embedding_dim) in ``params_dtype``, the same on
    every rank. Ids outside ``[0, num_embeddings)`` give zero vectors (no check: it would be a
    device sync per step).
    """

    parallel = "column"  # the vocab rows (dim 0) are split, like a column layer's n

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp: TPContext | None = None,
        params_dtype: torch.dtype | None = None,
        padding_size: int = DEFAULT_VOCAB_PADDING,
        prefix: str = "",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp if tp is not None else get_tp()
        self.prefix = prefix
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(
                f"{self.where}: num_embeddings and embedding_dim must be positive, got "
                f"{num_embeddings}, {embedding_dim}"
            )
        if padding_size < 1:
            raise ValueError(f"{self.where}: padding_size must be positive, got {padding_size}")
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.padding_idx = None
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.scheme = FP()
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp.size, padding_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp.size
        start = self.tp.rank * self.num_embeddings_per_partition
        self.vocab_start_index = start
        self.vocab_end_index = min(start + self.num_embeddings_per_partition, num_embeddings)
        self.num_valid_local = max(0, self.vocab_end_index - start)
        self.method = _VocabMethod()
        self._device = torch.device(device) if device is not None else torch.get_default_device()
        self._processed = False
        self.kernel_args: dict[str, Any] = {}
        self.param_views: dict[str, torch.Tensor | None] = {}
        if self.num_embeddings_padded != num_embeddings:
            self.source_padding = SourcePadding(0, num_embeddings, self.num_embeddings_padded)
        self._add_params(False)

    def _add_params(self, bias: bool) -> None:
        """The (padded) weight and, with ``bias``, the bias, from the FP scheme's specs."""
        specs = self.scheme.tensor_specs(
            self.num_embeddings_padded, self.embedding_dim, bias, self.params_dtype
        )
        for spec in specs if bias else specs[:1]:
            if self._parameters.get(spec.name) is None:
                self.add_checkpoint_param(spec)

    def segments(self, spec: Any, dim: int) -> list[Segment]:
        """Equal contiguous ranges of the padded vocab."""
        return [Segment.even(self.num_embeddings_padded, self.tp.rank, self.tp.size)]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (...) integer -> (..., embedding_dim)."""
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{self.where}: ids must be an integer tensor, got {ids!r:.60}")
        self._ensure_processed()
        if self.tp.size == 1:
            return F.embedding(ids, self.param_views["weight"])
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local = (ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local, self.param_views["weight"]).masked_fill(outside.unsqueeze(-1), 0)
        return ascend_ops.all_reduce(out, self.tp.hcom, inplace=True)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padded={self.num_embeddings_padded}, "
            f"rows {self.vocab_start_index}:{self.vocab_end_index}, tp={self.tp.rank}/{self.tp.size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection ``logits = x @ W.T (+ b)`` with W (vocab, hidden) vocab-sharded.

    x: (..., embedding_dim) -> (..., num_embeddings) gathered (default), or with
    ``gather_output=False`` this rank's (..., num_embeddings_per_partition) shard with the
    padding logits at -inf. ``tie_weights(embedding)`` shares a VocabParallelEmbedding's
    sharded weight (same TP context and padding).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bias: bool = False,
        *,
        gather_output: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.gather_output = bool(gather_output)
        self.has_bias = bool(bias)
        self.register_parameter("bias", None)
        if bias:
            self._add_params(True)
        self._tied: VocabParallelEmbedding | None = None

    def tie_weights(self, embedding: VocabParallelEmbedding) -> ParallelLMHead:
        """Use ``embedding``'s weight from now on (it must shard the same vocab the same way)."""
        same = isinstance(embedding, VocabParallelEmbedding) and (
            embedding.num_embeddings == self.num_embeddings
            and embedding.num_embeddings_padded == self.num_embeddings_padded
            and embedding.embedding_dim == self.embedding_dim
            and embedding.tp == self.tp
        )
        if not same:
            raise ValueError(
                f"{self.where}: can only tie to a VocabParallelEmbedding of the same vocab, "
                f"hidden size and TP context, got {embedding!r}"
            )
        del self._parameters["weight"]
        object.__setattr__(self, "_tied", embedding)  # a reference, not a submodule
        return self

    def __getattr__(self, name: str) -> Any:
        if name == "weight":
            tied = self.__dict__.get("_tied")
            if tied is not None:
                return tied.weight
        return super().__getattr__(name)

    def _ensure_processed(self) -> None:
        super()._ensure_processed()
        if self._tied is not None:
            self._tied._ensure_processed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., embedding_dim) -> (..., num_embeddings) or the local shard."""
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.embedding_dim,):
            raise ValueError(
                f"{self.where}: input last dim must be embedding_dim = {self.embedding_dim}, "
                f"got {getattr(x, 'shape', type(x).__name__)}"
            )
        self._ensure_processed()
        weight = (self if self._tied is None else self._tied).param_views["weight"]
        y = F.linear(x, weight, self.param_views["bias"])
        if not self.gather_output:
            if self.num_valid_local < self.num_embeddings_per_partition:
                y[..., self.num_valid_local :] = float("-inf")
            return y
        return gather_last_dim(y, self.tp)[..., : self.num_embeddings]

    def extra_repr(self) -> str:
        tied = ", tied" if self._tied is not None else ""
        return f"{super().extra_repr()}, gather_output={self.gather_output}{tied}"
