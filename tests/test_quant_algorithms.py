"""Quantization algorithms: error bounds, hand-checked golden tensors, bias folding, observers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_ops.kernels import quant_matmul, weight_quant_matmul
from quant.algorithms import (
    ActivationRange,
    MinMaxObserver,
    PercentileObserver,
    activation_qparams,
    compute_quant_bias,
    dequantize_linear,
    dequantize_weight,
    quantize_activation,
    quantize_linear,
    quantize_weight,
    storage_scale,
)
from quant.convention import deq_scale_to_float32, deq_scale_to_int64, to_antiquant_offset
from quant.schemes import W8A8, W8A16

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bound_ratio(w, qw):
    n, k = w.shape
    s = qw.scale.float().reshape(n, -1)
    s = s.repeat_interleave(k // s.shape[1], dim=1)
    w_hat = dequantize_weight(qw.qweight, qw.scale, qw.offset, qw.group_size)
    return float(((w.float() - w_hat).abs() / (s / 2)).max())


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("group_size,symmetric", [(0, True), (0, False), (32, True), (32, False)])
def test_error_at_most_half_scale(dt, group_size, symmetric):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 96, generator=g) * 0.05
    w[3] = 0.0  # an all-zero row
    w[5, 7] = 3.0  # an outlier
    w[6] = w[6].abs() + 0.1  # an all-positive row (asymmetric range widened to 0)
    qw = quantize_weight(w, group_size=group_size, symmetric=symmetric, scale_dtype=dt)
    assert qw.qweight.dtype == torch.int8 and qw.scale.dtype == dt
    assert _bound_ratio(w, qw) <= 1.0 + 1e-5
    if symmetric:
        assert bool((qw.offset == 0).all())
    else:  # integer offsets in [-128, 127]
        assert bool((qw.offset.float() == qw.offset.float().round()).all())
        assert int(qw.offset.float().min()) >= -128 and int(qw.offset.float().max()) <= 127


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    groups=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    symmetric=st.booleans(),
)
def test_error_bound_property(n, groups, seed, scale, symmetric):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, 32 * groups, generator=g) * scale).to(torch.bfloat16)
    qw = quantize_weight(w, group_size=32, symmetric=symmetric)
    assert _bound_ratio(w, qw) <= 1.0 + 1e-5


def test_storage_scale_rounds_up():
    s = torch.tensor([1.0 / 127, 0.3, 0.0])
    for dt in (torch.bfloat16, torch.float16):
        out = storage_scale(s, dt)
        assert out.dtype == dt
        assert bool((out.float() >= s).all())
        assert float(out[2]) == torch.finfo(dt).tiny


# ---- golden: a 2x4 layer computed by hand ------------------------------------------------------

W_SYM = torch.tensor([[63.5, -1.25, 0.75, 2.0], [0.25, -31.75, 0.375, 0.0]])


def test_golden_symmetric_per_channel():
    # row 0: absmax 63.5 -> scale 63.5/127 = 0.5; w/s = [127, -2.5, 1.5, 4]
    #        rint half-to-even -> [127, -2, 2, 4]
    # row 1: absmax 31.75 -> scale 0.25; w/s = [1, -127, 1.5, 0] -> [1, -127, 2, 0]
    qw = quantize_weight(W_SYM, scale_dtype=torch.float32)
    assert qw.qweight.tolist() == [[127, -2, 2, 4], [1, -127, 2, 0]]
    assert qw.scale.tolist() == [[0.5], [0.25]]
    assert qw.offset.tolist() == [[0.0], [0.0]]


def test_golden_asymmetric_offset_sign():
    # row 0: lo = -1, hi = 62.75 -> scale (62.75 + 1)/255 = 0.25,
    #        offset = rint(-128 - lo/scale) = -128 + 4 = -124,
    #        q = rint(w/0.25 + offset) = [-4-124, 0-124, 10-124, 251-124] = [-128, -124, -114, 127]
    # row 1: lo = -63.5, hi = 0.25 -> scale 63.75/255 = 0.25, offset = -128 + 254 = 126,
    #        q = [-254+126, -2+126, 1+126, 1+126] = [-128, 124, 127, 127]
    # msmodelslim: w = (q - offset) * scale; kernel: w = (q + antiquant_offset) * scale with
    # antiquant_offset = -offset = [124, -126].
    w = torch.tensor([[-1.0, 0.0, 2.5, 62.75], [-63.5, -0.5, 0.25, 0.25]])
    qw = quantize_weight(w, symmetric=False, scale_dtype=torch.float32)
    assert qw.qweight.tolist() == [[-128, -124, -114, 127], [-128, 124, 127, 127]]
    assert qw.scale.tolist() == [[0.25], [0.25]]
    assert qw.offset.tolist() == [[-124.0], [126.0]]
    anti = to_antiquant_offset(qw.offset)
    assert anti.tolist() == [[124.0], [-126.0]]
    # the kernel's (q + antiquant_offset) * scale reproduces w exactly here
    x = torch.eye(4, dtype=torch.float32)
    y = weight_quant_matmul(x, qw.qweight.t(), qw.scale.reshape(-1), anti.reshape(-1))
    assert torch.equal(y, w.t())


def test_golden_w8a8_static():
    # weight: W_SYM -> Wq = [[127, -2, 2, 4], [1, -127, 2, 0]], weight_scale [0.5, 0.25]
    # inputs observed in [-2, 13.9375]: input_scale = 15.9375/255 = 0.0625,
    #        input_offset = rint(-128 - (-2)/0.0625) = -96
    # deq_scale = 0.0625 * [0.5, 0.25] = [0.03125, 0.015625]
    # sum_k Wq = [131, -124]; bias = [1.0, -0.5]
    # quant_bias = rint(bias/deq) - input_offset * sum_k Wq
    #            = [32 + 96*131, -32 + 96*(-124)] = [12608, -11936]
    bias = torch.tensor([1.0, -0.5])
    t = quantize_linear(
        W_SYM, bias, W8A8(), model_dtype=torch.float32, act_range=ActivationRange(-2.0, 13.9375)
    )
    assert t["input_scale"].tolist() == [0.0625]
    assert t["input_offset"].tolist() == [-96.0]
    assert t["deq_scale"].dtype == torch.float32
    assert t["deq_scale"].tolist() == [0.03125, 0.015625]
    assert t["quant_bias"].dtype == torch.int32
    assert t["quant_bias"].tolist() == [12608, -11936]
    # x = [1, 0.5, -0.25, 2] -> x_q = rint(x/0.0625 - 96) = [-80, -88, -100, -64]
    x = torch.tensor([[1.0, 0.5, -0.25, 2.0]])
    xq = quantize_activation(x, t["input_scale"], t["input_offset"])
    assert xq.tolist() == [[-80, -88, -100, -64]]
    # row 0: (-10440 + 12608) * 0.03125 = 67.75; row 1: (10896 - 11936) * 0.015625 = -16.25
    # = x @ dequantized(W)^T + bias exactly (dequantized rows [63.5,-1,1,2], [0.25,-31.75,0.5,0])
    y = quant_matmul(
        xq, t["weight"].t(), t["deq_scale"], bias=t["quant_bias"], output_dtype=torch.float32
    )
    assert y.tolist() == [[67.75, -16.25]]
    # fp16 model: deq_scale stored as int64 with the float32 bits (0.03125 = 0x3D000000)
    t16 = quantize_linear(
        W_SYM, bias, W8A8(), model_dtype=torch.float16, act_range=ActivationRange(-2.0, 13.9375)
    )
    assert t16["deq_scale"].dtype == torch.int64
    assert t16["deq_scale"].tolist() == [0x3D000000, 0x3C800000]
    assert t16["input_scale"].dtype == torch.float16


def test_deq_scale_int64_round_trip_bit_exact():
    s = torch.rand(1000) * 1e-3 + 1e-9
    packed = deq_scale_to_int64(s)
    assert packed.dtype == torch.int64 and bool((packed >= 0).all())
    assert torch.equal(deq_scale_to_float32(packed).view(torch.int32), s.view(torch.int32))
    sign_extended = s.view(torch.int32).to(torch.int64)  # vllm-ascend's numpy conversion
    assert torch.equal(deq_scale_to_float32(sign_extended), s)


def test_quant_bias_folds_input_offset_exactly():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    b = torch.randn(16, generator=g)
    t = quantize_linear(
        w, b, W8A8(), model_dtype=torch.float32, act_range=ActivationRange(-1.0, 3.0)
    )
    xq = torch.randint(-128, 128, (5, 64), generator=g, dtype=torch.int8)
    off = int(t["input_offset"])
    acc = (xq.long() - off) @ t["weight"].long().t()  # exact (x_q - offset) @ Wq
    bias_q = torch.round(b.double() / t["deq_scale"].double()).long()
    assert torch.equal(xq.long() @ t["weight"].long().t() + t["quant_bias"].long(), acc + bias_q)
    # and without a bias, quant_bias is only the offset term
    qb = compute_quant_bias(None, t["deq_scale"], t["weight"], t["input_offset"])
    assert torch.equal(qb.long(), -off * t["weight"].long().sum(1))
    _, bias_back = dequantize_linear(t, W8A8())
    assert torch.allclose(bias_back, b, atol=float(t["deq_scale"].max()))


def test_quant_bias_overflow_is_an_error():
    with pytest.raises(ValueError, match="int32"):
        compute_quant_bias(
            torch.tensor([1e6]),
            torch.tensor([1e-6]),
            torch.ones(1, 4, dtype=torch.int8),
            torch.tensor([0.0]),
        )


def test_observers():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    x[17] = 1000.0
    mm = MinMaxObserver()
    mm.update(x[:5000])
    mm.update(x[5000:])
    assert mm.range().hi == 1000.0
    pc = PercentileObserver(99.9)
    pc.update(x)
    r = pc.range()
    assert 2.0 < r.hi < 5.0 and -5.0 < r.lo < -2.0  # the outlier is ignored
    scale, offset = activation_qparams(r, torch.bfloat16)
    assert scale.dtype == torch.bfloat16 and offset.dtype == torch.bfloat16
    assert float(scale) >= (r.hi - r.lo) / 255
    with pytest.raises(ValueError):
        MinMaxObserver().range()


def test_symmetric_activation_qparams():
    s, o = activation_qparams(ActivationRange(-2.0, 1.0), torch.float32, symmetric=True)
    assert float(o) == 0.0 and float(s) == pytest.approx(2.0 / 127)


def test_w8a16_dequantize_linear_matches_kernel_dequant():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 64, generator=g)
    t = quantize_linear(w, None, W8A16(group_size=32, symmetric=False), model_dtype=torch.float32)
    w_hat, _ = dequantize_linear(t, W8A16(group_size=32, symmetric=False))
    x = torch.eye(64)
    y = weight_quant_matmul(
        x,
        t["weight"].t(),
        t["weight_scale"].t().contiguous(),
        to_antiquant_offset(t["weight_offset"]).t().contiguous(),
        antiquant_group_size=32,
    )
    assert torch.allclose(y, w_hat.t(), atol=1e-6)
