"""ascend_ops: the fused MC2 ops (``mm_all_reduce_base``, ``all_gather_base_mm``,
``mm_reduce_scatter_base``) with the vendor's contract, its portable
golden backend, the Ascend (torch_npu) backend, and the helper kernels the layers need."""

from ascend_ops._validate import OpSpec, Scenario, check_mm_all_reduce_base
from ascend_ops.backend import Backend, NpuNotAvailableError, npu_available, use_backend
from ascend_ops.hcom import LOCAL_HCOM, hcom_name, resolve_hcom
from ascend_ops.kernels import (
    antiquant_weight,
    dynamic_quant,
    fp_matmul,
    mm_local,
    quant_matmul,
    quantize,
    weight_quant_matmul,
)
from ascend_ops.op import (
    all_gather,
    all_gather_base_mm,
    all_gather_dim0,
    all_reduce,
    mm_all_reduce_base,
    mm_reduce_scatter_base,
    reduce_scatter_dim0,
)
from ascend_ops.quant_param import trans_quant_param, unpack_quant_param

__all__ = [
    "LOCAL_HCOM",
    "Backend",
    "NpuNotAvailableError",
    "OpSpec",
    "Scenario",
    "all_gather",
    "all_gather_base_mm",
    "all_gather_dim0",
    "all_reduce",
    "antiquant_weight",
    "check_mm_all_reduce_base",
    "dynamic_quant",
    "fp_matmul",
    "hcom_name",
    "mm_all_reduce_base",
    "mm_local",
    "mm_reduce_scatter_base",
    "npu_available",
    "quant_matmul",
    "quantize",
    "reduce_scatter_dim0",
    "resolve_hcom",
    "trans_quant_param",
    "unpack_quant_param",
    "use_backend",
    "weight_quant_matmul",
]
