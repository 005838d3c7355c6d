"""Scheme configs: tensor specs (names, shapes, dtypes) and validation."""

from __future__ import annotations

import pytest
import torch

from quant.schemes import FP, W8A8, W8A16, TensorSpec, parse_scheme


def _specs(scheme, n=8, k=64, bias=True, dt=torch.bfloat16):
    return {s.name: (s.shape, s.dtype, s.required) for s in scheme.tensor_specs(n, k, bias, dt)}


def test_fp_specs():
    assert _specs(FP()) == {
        "weight": ((8, 64), torch.bfloat16, True),
        "bias": ((8,), torch.bfloat16, True),
    }
    assert "bias" not in _specs(FP(), bias=False)


def test_w8a16_per_channel_and_group_specs():
    assert _specs(W8A16()) == {
        "weight": ((8, 64), torch.int8, True),
        "weight_scale": ((8, 1), torch.bfloat16, True),
        "weight_offset": ((8, 1), torch.bfloat16, True),
        "bias": ((8,), torch.bfloat16, True),
    }
    s = _specs(W8A16(group_size=32), bias=False, dt=torch.float16)
    assert s["weight_scale"] == ((8, 2), torch.float16, True)
    assert "bias" not in s


@pytest.mark.parametrize(
    "dt,deq",
    [(torch.float16, torch.int64), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
)
def test_w8a8_static_specs_deq_scale_dtype_by_model_dtype(dt, deq):
    s = _specs(W8A8(), dt=dt)
    assert s["deq_scale"] == ((8,), deq, True)
    assert s["quant_bias"] == ((8,), torch.int32, True)
    assert s["input_scale"] == ((1,), dt, True)
    assert s["input_offset"] == ((1,), dt, True)
    assert s["weight_scale"] == ((8, 1), dt, False)  # optional (older msmodelslim omit it)
    assert "bias" not in s  # folded into quant_bias


def test_w8a8_dynamic_specs():
    s = _specs(W8A8(dynamic=True))
    assert set(s) == {"weight", "weight_scale", "weight_offset", "bias"}
    assert W8A8(dynamic=True).name == "W8A8_DYNAMIC" and W8A8().name == "W8A8"


@pytest.mark.parametrize("g", [-32, 16, 33, 48])
def test_w8a16_bad_group_size(g):
    with pytest.raises(ValueError, match="multiple of 32"):
        W8A16(group_size=g)


def test_w8a16_group_size_must_divide_k_and_be_below_k():
    with pytest.raises(ValueError, match="does not divide"):
        W8A16(group_size=64).tensor_specs(8, 96, False, torch.bfloat16)
    with pytest.raises(ValueError, match="smaller than"):
        W8A16(group_size=64).tensor_specs(8, 64, False, torch.bfloat16)


def test_parse_scheme():
    assert parse_scheme("FLOAT") == FP()
    assert parse_scheme("w8a16", 64) == W8A16(group_size=64)
    assert parse_scheme("W8A8") == W8A8()
    assert parse_scheme("W8A8_DYNAMIC") == W8A8(dynamic=True)
    with pytest.raises(ValueError, match="unknown quant type"):
        parse_scheme("W4A4")


def test_spec_check_accepts_known_alternatives_and_rejects_others():
    spec = {s.name: s for s in W8A16().tensor_specs(8, 64, False, torch.bfloat16)}
    spec["weight_scale"].check((8,), torch.float32)  # msmodelslim doc: [n] float32
    with pytest.raises(ValueError, match="weight_scale: shape"):
        spec["weight_scale"].check((8, 2), torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        spec["weight"].check((8, 64), torch.uint8)
    assert isinstance(spec["weight"], TensorSpec)


def test_schemes_are_found_by_quant_type_and_know_their_calibration():
    from quant.schemes import scheme_from_name

    assert scheme_from_name("fp16") == FP() and scheme_from_name(" w8a8_dynamic ") == W8A8(True)
    assert W8A8().needs_calibration and not W8A8(dynamic=True).needs_calibration
    assert not W8A16().needs_calibration and not FP().needs_calibration


def test_quantizer_refuses_fp16_scales_whose_products_overflow():
    from quant.algorithms import quantize_weight

    w = torch.full((2, 64), 0.5)
    w[1, 3] = 70000.0  # fits float32; (q - offset) * scale would be > 65504 in fp16
    with pytest.raises(ValueError, match=r"fp16 scales overflow.*65504.*in 1 rows/groups"):
        quantize_weight(w, scale_dtype=torch.float16)
    quantize_weight(w, scale_dtype=torch.bfloat16)  # bf16 has the range


def test_spec_checks_values_in_the_dtype_the_kernel_uses():
    spec = W8A16().spec_map(4, 64, False, torch.float16)["weight_scale"]
    ok = spec.validate(torch.full((4, 1), 1e-3), "l.weight_scale")
    assert ok.dtype == torch.float32
    with pytest.raises(ValueError, match=r"l\.weight_scale: contains a zero scale after the cast"):
        spec.validate(torch.tensor([[1e-3], [1e-8], [1e-3], [1e-3]]), "l.weight_scale")
    with pytest.raises(ValueError, match=r"overflows torch\.float16"):
        spec.validate(torch.tensor([[1e-3], [1e5], [1e-3], [1e-3]]), "l.weight_scale")
    with pytest.raises(ValueError, match="NaN or inf"):
        spec.validate(torch.tensor([[float("nan")]] * 4), "l.weight_scale")
