"""Vocab-parallel input embedding and lm_head (vLLM ``vocab_parallel_embedding.py`` / Megatron
``VocabParallelEmbedding`` semantics).

The vocab rows are padded to a multiple of ``tp * 64`` and split in equal contiguous ranges:
rank r holds padded rows ``[r * per, (r + 1) * per)``, ``per = padded / tp``. Padding rows are
zero and never produce output: the embedding gives zeros for ids outside a rank's valid range
and the all-reduce sums the ranks' lookups; the lm_head drops the padding logits after the
gather (or sets them to -inf in a local shard), so they are never returned or sampled. A tied
lm_head uses the embedding's sharded weight (one tensor).

Loading follows the linear layers' protocol (``tp_layers.loader``): ``checkpoint_params()``,
``load_into(name, dest, loaded)`` from a full ``(vocab, hidden)`` tensor (or already padded
``(padded, hidden)``), a lazy safetensors slice or a ``quant.checkpoint.StoredTensor``, each
rank reading only its rows; ``weight_loader(param, loaded)`` in place; and
``process_weights_after_loading()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ascend_ops
from quant.schemes import FP, TensorSpec
from tp_layers.comm import gather_last_dim
from tp_layers.context import TPContext, get_tp
from tp_layers.sharding import full_shape, read_range, source_dtype

__all__ = ["DEFAULT_VOCAB_PADDING", "ParallelLMHead", "VocabParallelEmbedding", "pad_vocab_size"]

DEFAULT_VOCAB_PADDING = 64


def pad_vocab_size(vocab_size: int, tp_size: int, padding: int = DEFAULT_VOCAB_PADDING) -> int:
    """``vocab_size`` rounded up to a multiple of ``tp_size * padding``."""
    step = tp_size * padding
    return -(-vocab_size // step) * step


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding(num_embeddings, embedding_dim)`` with the vocab rows sharded over TP.

    ids: any shape, integer -> (*ids.shape, embedding_dim) in ``params_dtype``, the same on
    every rank. Ids outside ``[0, num_embeddings)`` give zero vectors (no check: it would be a
    device sync per step).
    """

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
        spec = FP().tensor_specs(num_embeddings, embedding_dim, False, self.params_dtype)[0]
        padded = (self.num_embeddings_padded, embedding_dim)
        if padded != spec.shape:
            spec = dataclasses.replace(spec, accept_shapes=(padded,))
        shape = (self.num_embeddings_per_partition, embedding_dim)
        dev = torch.device(device) if device is not None else torch.get_default_device()
        self.weight = self._checkpoint_param(shape, spec, dev)
        self._processed = False
        self.op_args: dict[str, Any] = {}  # loader protocol: no kernel arguments

    @property
    def where(self) -> str:
        return self.prefix or type(self).__name__

    def _checkpoint_param(
        self, shape: tuple[int, ...], spec: TensorSpec, device: torch.device
    ) -> nn.Parameter:
        """A frozen parameter of this rank's rows, with the attributes the loader reads."""
        p = nn.Parameter(torch.empty(shape, dtype=self.params_dtype, device=device), False)
        p.tp_dim, p.kind, p.raw_shape, p.raw_dtype, p.spec = 0, spec.name, shape, p.dtype, spec
        p.weight_loader = self.weight_loader
        return p

    # -- loading (tp_layers.loader protocol) --------------------------------------------------
    def checkpoint_params(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    def load_into(self, name: str, dest: torch.Tensor, loaded: Any, shard_id: Any = None) -> None:
        """Write this rank's rows of checkpoint tensor ``loaded`` into ``dest`` (per, hidden);
        padding rows become zero."""
        if name != "weight" or shard_id is not None:  # ParallelLMHead adds "bias"
            raise KeyError(f"{self.where}: no parameter {name!r} (shard {shard_id!r})")
        spec = self.weight.spec
        shape = full_shape(loaded)
        if shape not in spec.allowed_shapes():
            raise ValueError(
                f"{self.where}.weight: checkpoint shape {list(shape)} does not match the expected "
                f"{' or '.join(str(list(s)) for s in spec.allowed_shapes())}"
            )
        stored = source_dtype(loaded)
        if stored not in spec.allowed_dtypes():
            raise ValueError(f"{self.where}.weight: checkpoint dtype {stored} is not a float dtype")
        n = self.num_valid_local
        if n:
            read_range(loaded, 0, self.vocab_start_index, n, out=dest.narrow(0, 0, n))
        dest[n:].zero_()

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        """vLLM-style loader: keep this rank's rows of ``loaded`` in ``param`` (replaced if on
        meta)."""
        name = next(n for n, q in self.checkpoint_params().items() if q is param)
        on_meta = param.device.type == "meta"
        dest = torch.empty(param.raw_shape, dtype=param.raw_dtype) if on_meta else param.data
        self.load_into(name, dest, loaded, shard_id)
        if on_meta:
            new = nn.Parameter(dest, requires_grad=False)
            new.__dict__.update(param.__dict__)
            self._parameters[name] = new
        self._processed = False

    def process_weights_after_loading(self) -> None:
        """Check the weights are loaded (nothing to transform). Idempotent."""
        if any(
            p.device.type == "meta"
            for p in (self.weight, getattr(self, "bias", None))
            if p is not None
        ):
            raise RuntimeError(f"{self.where}: weights are not loaded (meta tensors)")
        self._processed = True

    # -- forward ------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (...) integer -> (..., embedding_dim)."""
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{self.where}: ids must be an integer tensor, got {ids!r:.60}")
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local = (ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
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
        self.bias = None
        if bias:
            spec = FP().tensor_specs(num_embeddings, embedding_dim, True, self.params_dtype)[1]
            shape = (self.num_embeddings_per_partition,)
            self.bias = self._checkpoint_param(shape, spec, self.weight.device)
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

    def checkpoint_params(self) -> dict[str, nn.Parameter]:
        out = {} if self._tied is not None else {"weight": self.weight}
        return out | ({"bias": self.bias} if self.bias is not None else {})

    def load_into(self, name: str, dest: torch.Tensor, loaded: Any, shard_id: Any = None) -> None:
        if name != "bias":
            return super().load_into(name, dest, loaded, shard_id)
        shape = full_shape(loaded)
        if shape not in ((self.num_embeddings,), (self.num_embeddings_padded,)):
            raise ValueError(
                f"{self.where}.bias: checkpoint shape {list(shape)} does not match the expected "
                f"[{self.num_embeddings}]"
            )
        n = self.num_valid_local
        if n:
            read_range(loaded, 0, self.vocab_start_index, n, out=dest.narrow(0, 0, n))
        dest[n:].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., embedding_dim) -> (..., num_embeddings) or the local shard."""
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.embedding_dim,):
            raise ValueError(
                f"{self.where}: input last dim must be embedding_dim = {self.embedding_dim}, "
                f"got {getattr(x, 'shape', type(x).__name__)}"
            )
        y = F.linear(x, self.weight, self.bias)
        if not self.gather_output:
            if self.num_valid_local < self.num_embeddings_per_partition:
                y[..., self.num_valid_local :] = float("-inf")
            return y
        return gather_last_dim(y, self.tp)[..., : self.num_embeddings]

    def extra_repr(self) -> str:
        tied = ", tied" if self._tied is not None else ""
        return f"{super().extra_repr()}, gather_output={self.gather_output}{tied}"
