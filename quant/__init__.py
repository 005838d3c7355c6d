"""Quantization for the Ascend tensor-parallel layers: schemes, algorithms, msmodelslim
checkpoints, a converter CLI (``python -m quant``) and a reference ``quantize_``.

Knows nothing of parallelism; uses only ``ascend_ops`` helper kernels for its math.
"""

from quant.algorithms import (
    ActivationRange,
    MinMaxObserver,
    PercentileObserver,
    QuantizedWeight,
    activation_qparams,
    compute_deq_scale,
    compute_quant_bias,
    dequantize_linear,
    dequantize_weight,
    dynamic_quant_activation,
    quantize_activation,
    quantize_linear,
    quantize_weight,
)
from quant.calibration import (
    Calibration,
    collect_activations,
    load_calibration,
    observe_ranges,
    save_activations,
)
from quant.checkpoint import (
    CheckpointFileError,
    CheckpointReader,
    CheckpointWriteError,
    CheckpointWriter,
    FileChangedError,
    StoredTensor,
    TensorInfo,
)
from quant.convention import (
    deq_scale_to_float32,
    deq_scale_to_int64,
    from_antiquant_offset,
    to_antiquant_offset,
)
from quant.convert import ConvertResult, LayerReport, format_report, quantize_checkpoint
from quant.evaluate import Perplexity, evaluate_perplexity
from quant.modules import DEFAULT_SKIP_PATTERNS, QuantLinear, is_skipped, quantize_
from quant.schemes import FP, W8A8, W8A16, Scheme, TensorSpec, parse_scheme, scheme_from_name

__all__ = [
    "DEFAULT_SKIP_PATTERNS",
    "FP",
    "FileChangedError",
    "W8A8",
    "W8A16",
    "ActivationRange",
    "Calibration",
    "CheckpointFileError",
    "CheckpointReader",
    "CheckpointWriteError",
    "CheckpointWriter",
    "ConvertResult",
    "LayerReport",
    "MinMaxObserver",
    "Perplexity",
    "PercentileObserver",
    "QuantLinear",
    "QuantizedWeight",
    "Scheme",
    "StoredTensor",
    "TensorInfo",
    "TensorSpec",
    "activation_qparams",
    "collect_activations",
    "compute_deq_scale",
    "compute_quant_bias",
    "deq_scale_to_float32",
    "deq_scale_to_int64",
    "dequantize_linear",
    "dequantize_weight",
    "dynamic_quant_activation",
    "evaluate_perplexity",
    "format_report",
    "from_antiquant_offset",
    "is_skipped",
    "load_calibration",
    "observe_ranges",
    "parse_scheme",
    "quantize_",
    "quantize_activation",
    "quantize_checkpoint",
    "quantize_linear",
    "quantize_weight",
    "save_activations",
    "scheme_from_name",
    "to_antiquant_offset",
]
