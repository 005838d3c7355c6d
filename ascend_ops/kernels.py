"""The helper kernels the layers call, dispatched by backend: tensors the Ascend backend owns
go to torch_npu (``_npu``), everything else to the portable golden implementations
(``_portable``, whose docstring states the rounding of each scenario).

Rounding to int8 (quantize, dynamic_quant) is round-half-to-even (the vendor's CAST_RINT on
Atlas A2) followed by saturation to [-128, 127].
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch

from ascend_ops import _portable, backend
from ascend_ops._portable import (
    BF16_GEMM_MAX_M,
    W8A8_INT_MM_MAX_M,
    W8A16_INT8PACK_MAX_M,
    antiquant_weight,
    prepare_w8a16_weight,
)
from ascend_ops.contract import w8a8_output_dtype

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "BF16_GEMM_MAX_M",
    "W8A16_INT8PACK_MAX_M",
    "W8A8_INT_MM_MAX_M",
    "antiquant_weight",
    "dynamic_quant",
    "fp_matmul",
    "mm_local",
    "prepare_w8a16_weight",
    "quant_matmul",
    "quantize",
    "w8a8_output_dtype",
    "weight_quant_matmul",
]


def _on_npu(t: torch.Tensor) -> bool:
    return backend.select(t) is backend.Backend.ASCEND


def _dispatched(portable_fn: Callable[P, R]) -> Callable[P, R]:
    """``portable_fn``'s signature and docstring; calls on the Ascend backend (by the first
    argument's device) go to ``_npu``'s function of the same name, with every argument bound
    (the adapters take no defaults)."""
    sig = inspect.signature(portable_fn)
    name = portable_fn.__name__
    params = list(sig.parameters.values())
    kinds = [p.kind for p in params]
    n_pos = kinds.count(inspect.Parameter.POSITIONAL_OR_KEYWORD)
    assert kinds[n_pos:] == [inspect.Parameter.KEYWORD_ONLY] * (len(params) - n_pos), name
    names = tuple(p.name for p in params)
    defaults = {p.name: p.default for p in params if p.default is not p.empty}

    def bind(args: tuple, kwargs: dict) -> tuple[list, dict]:
        # Signature.bind + apply_defaults in plain Python: dynamo cannot trace
        # inspect.Signature.bind on torch 2.5.1 ("inline in skipfiles"; 2.7.1 can)
        rest = names[len(args) :]
        ok = len(args) <= n_pos
        for k in kwargs:
            ok = ok and k in rest
        for n in rest:
            ok = ok and (n in kwargs or n in defaults)
        if not ok:
            sig.bind(*args, **kwargs)  # raises the TypeError naming the argument
        pos = [
            *args,
            *[kwargs[n] if n in kwargs else defaults[n] for n in rest[: n_pos - len(args)]],
        ]
        kw = {n: kwargs[n] if n in kwargs else defaults[n] for n in names[n_pos:]}
        return pos, kw

    @functools.wraps(portable_fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        first = args[0] if args else next(iter(kwargs.values()))
        if _on_npu(first):  # type: ignore[arg-type]
            from ascend_ops import _npu

            pos, kw = bind(args, kwargs)
            return getattr(_npu, name)(*pos, **kw)
        return portable_fn(*args, **kwargs)

    return call


fp_matmul = _dispatched(_portable.fp_matmul)
weight_quant_matmul = _dispatched(_portable.weight_quant_matmul)
quant_matmul = _dispatched(_portable.quant_matmul)
dynamic_quant = _dispatched(_portable.dynamic_quant)


def quantize(
    input: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None = None,
    dtype: torch.dtype = torch.int8,
    axis: int = 1,
    div_mode: bool = True,
) -> torch.Tensor:
    """Static quantization (npu_quantize): ``rint(x / scales + zero_points)`` (div_mode) or
    ``rint(x * scales + zero_points)``, saturated to int8.

    input: any shape, float; scales / zero_points: [1] (per-tensor) or [input.shape[axis]]
    (per-channel). Returns int8, input's shape.
    """
    if dtype not in (torch.int8, torch.qint8):
        raise ValueError(f"dtype: only int8 output is supported, got {dtype}")
    if _on_npu(input):
        from ascend_ops import _npu

        return _npu.quantize(input, scales, zero_points, axis, div_mode)
    return _portable.quantize(input, scales, zero_points, axis, div_mode)


@functools.wraps(_portable.mm_local)
def mm_local(*args: Any, **kwargs: Any) -> torch.Tensor:
    """The fused op's per-rank value (everything but the all-reduce), by scenario, each kernel
    on x1's backend (``_portable.mm_local`` with this module's dispatching kernels)."""
    return _portable.mm_local(*args, ops=sys.modules[__name__], **kwargs)
