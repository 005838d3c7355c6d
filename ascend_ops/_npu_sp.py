"""Ascend backend of the sequence-parallel MC2 ops: one call into torch_npu.

``torch_npu.npu_all_gather_base_mm`` / ``npu_mm_reduce_scatter_base`` took only ``bias``,
``gather_index``, ``gather_output``, ``comm_turn`` (and ``reduce_op``) up to torch_npu 2.1.0.post8;
2.7.1 and 2.14.0 add ``x1_scale``, ``x2_scale``, ``output_dtype`` and ``comm_mode`` (their
``npu_native_functions.yaml``). Keyword arguments left at their schema default are therefore not
passed, so an FP call works on every release; a quantized call on an old release fails in
torch_npu itself. (A schema-reading adapter for every op replaces this in ascend_ops._npu.)
"""

from __future__ import annotations

from typing import Any

import torch

from ascend_ops import backend

__all__ = ["call"]

# the schema defaults of the keyword arguments (torch_npu 2.14.0 npu_native_functions.yaml)
_DEFAULTS: dict[str, Any] = {
    "reduce_op": "sum",
    "bias": None,
    "x1_scale": None,
    "x2_scale": None,
    "gather_index": 0,
    "gather_output": True,
    "comm_turn": 0,
    "output_dtype": None,
    "comm_mode": None,
}


def call(
    op: str, input: torch.Tensor, x2: torch.Tensor, hcom: str, world_size: int, **kwargs: Any
) -> Any:
    """``torch_npu.npu_<op>(input, x2, hcom, world_size, **non-default kwargs)``.

    op: "all_gather_base_mm" -> (output, gather_out); "mm_reduce_scatter_base" -> output.
    """
    fn = getattr(backend.npu_module(), f"npu_{op}")
    passed = {k: v for k, v in kwargs.items() if k not in _DEFAULTS or v != _DEFAULTS[k]}
    return fn(input, x2, hcom, world_size, **passed)
