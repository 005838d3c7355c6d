"""tp_layers: tensor-parallel linear layers (FP, W8A16, W8A8) on the fused MC2 op.

The only package that knows about ranks, shards and the prefill/decode phase. Optional
integrations (transformers, megatron-core) live in their adapter modules and are imported
only there, so ``import tp_layers`` works without them.
"""

from tp_layers.context import TPContext, get_tp, init_tp
from tp_layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tp_layers.linear import (
    ColumnParallelLinear,
    HeadReplicatedColumnLinear,
    MergedColumnParallelLinear,
    ParallelLinearBase,
    QKVParallelLinear,
    RowParallelLinear,
    path_counts,
    reset_path_counts,
)
from tp_layers.loader import CheckpointError, LoadReport, load_weights
from tp_layers.methods import method_for
from tp_layers.phase import (
    Phase,
    current_phase,
    infer_phase,
    phase,
    prefill_threshold,
    set_prefill_threshold,
)
from tp_layers.sequence import gather_tokens, reduce_scatter_tokens, split_tokens, token_shard

__all__ = [
    "CheckpointError",
    "ColumnParallelLinear",
    "HeadReplicatedColumnLinear",
    "LoadReport",
    "load_weights",
    "MergedColumnParallelLinear",
    "ParallelLinearBase",
    "ParallelLMHead",
    "Phase",
    "QKVParallelLinear",
    "RowParallelLinear",
    "TPContext",
    "VocabParallelEmbedding",
    "current_phase",
    "gather_tokens",
    "get_tp",
    "infer_phase",
    "init_tp",
    "load_pretrained",
    "method_for",
    "parallelize",
    "path_counts",
    "phase",
    "prefill_threshold",
    "reduce_scatter_tokens",
    "reset_path_counts",
    "set_prefill_threshold",
    "split_tokens",
    "token_shard",
]

# The transformers adapter (tp_layers.hf) imports transformers: exported lazily, so that
# ``import tp_layers`` works without it.
_HF_EXPORTS = ("parallelize", "load_pretrained")


def __getattr__(name: str):
    if name in _HF_EXPORTS:
        from tp_layers import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'tp_layers' has no attribute {name!r}")
