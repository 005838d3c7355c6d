"""tp_layers: tensor-parallel linear layers (FP, W8A16, W8A8) on the fused MC2 op.

The only package that knows about ranks, shards and the prefill/decode phase. Optional
integrations (transformers, megatron-core) live in their adapter modules and are imported
only there, so ``import tp_layers`` works without them.
"""

from tp_layers.context import TPContext, get_tp, init_tp
from tp_layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLinearBase,
    QKVParallelLinear,
    RowParallelLinear,
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

__all__ = [
    "CheckpointError",
    "ColumnParallelLinear",
    "LoadReport",
    "load_weights",
    "MergedColumnParallelLinear",
    "ParallelLinearBase",
    "Phase",
    "QKVParallelLinear",
    "RowParallelLinear",
    "TPContext",
    "current_phase",
    "get_tp",
    "infer_phase",
    "init_tp",
    "method_for",
    "phase",
    "prefill_threshold",
    "set_prefill_threshold",
]
