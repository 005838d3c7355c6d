"""GPTQ (``quant.gptq``): lower layer output error than min-max rounding, same storage."""

from __future__ import annotations

import pytest
import torch

from quant.algorithms import dequantize_weight, quantize_weight
from quant.gptq import gptq_quantize_weight, hessian


def _data(n: int = 64, k: int = 256, rows: int = 1024):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(rows, k, generator=g) @ mix  # correlated input channels, as in LLMs
    x[:, :4] *= 8.0
    w = torch.randn(n, k, generator=g) * 0.02
    return x, w


def _out_err(x, w, qw) -> float:
    w_hat = dequantize_weight(qw.qweight, qw.scale, qw.offset, qw.group_size)
    return float(torch.linalg.norm(x @ (w - w_hat).t()) / torch.linalg.norm(x @ w.t()))


@pytest.mark.parametrize(
    ("group_size", "symmetric"), [(0, True), (0, False), (64, True), (32, False)]
)
def test_gptq_lowers_layer_output_error_vs_minmax(group_size, symmetric):
    x, w = _data()
    calib, held_out = x[:768], x[768:]
    mm = quantize_weight(w, group_size=group_size, symmetric=symmetric, scale_dtype=torch.bfloat16)
    gq = gptq_quantize_weight(
        w,
        hessian(calib),
        group_size=group_size,
        symmetric=symmetric,
        scale_dtype=torch.bfloat16,
        block_size=64,
    )
    assert gq.qweight.dtype == torch.int8 and gq.scale.shape == mm.scale.shape
    assert gq.scale.dtype == torch.bfloat16 and gq.offset.shape == mm.offset.shape
    e_mm, e_gq = _out_err(held_out, w, mm), _out_err(held_out, w, gq)
    assert e_gq < 0.8 * e_mm, (e_gq, e_mm)


def test_gptq_per_channel_scales_are_min_max_and_dead_inputs_ok():
    x, w = _data(k=128)
    x[:, 5] = 0.0  # an input never active
    gq = gptq_quantize_weight(w, hessian(x), scale_dtype=torch.float32)
    mm = quantize_weight(w, scale_dtype=torch.float32)
    torch.testing.assert_close(gq.scale, mm.scale)
    assert bool((gq.qweight[:, 5] == 0).all())
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize_weight(w, torch.eye(3))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize_weight(w, hessian(x), group_size=48)
