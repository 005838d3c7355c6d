"""trans_quant_param / unpack_quant_param (KERNELS.md "npu_trans_quant_param"), bit-exact."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_ops.quant_param import trans_quant_param, truncate_scale, unpack_quant_param

FLAG = 1 << 46


def _f32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _bits_of(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _scale_from_bits(bits: list[int]) -> torch.Tensor:
    b = torch.tensor([v - 2**32 if v >= 2**31 else v for v in bits], dtype=torch.int32)
    return b.view(torch.float32)


# --- hand-worked bit patterns --------------------------------------------------------------


def test_scale_one() -> None:
    # 1.0f = 0x3F800000 (no low mantissa bits); bit 46 = 0x4000_0000_0000.
    out = trans_quant_param(torch.tensor([1.0]))
    assert out.dtype == torch.int64 and out.shape == (1,)
    assert out.item() == 0x4000_3F80_0000


def test_scale_truncation_of_low_mantissa_bits() -> None:
    # 0.1f = 0x3DCCCCCD; & 0xFFFFE000 -> 0x3DCCC000 = 1.599609375 * 2^-4 = 0.0999755859375.
    s = torch.tensor([0.1])
    assert s.view(torch.int32).item() == 0x3DCCCCCD
    out = trans_quant_param(s)
    assert out.item() == 0x4000_3DCC_C000
    assert truncate_scale(s).item() == 0.0999755859375
    # 1 + 8191 * 2^-23 (all 13 low bits set) truncates to exactly 1.0 (never rounds up) ...
    s2 = _scale_from_bits([0x3F801FFF])
    assert trans_quant_param(s2).item() == 0x4000_3F80_0000
    # ... while bit 13 (the lowest kept bit) survives.
    s3 = _scale_from_bits([0x3F802000])
    assert trans_quant_param(s3).item() == 0x4000_3F80_2000


def test_negative_scale() -> None:
    # -2.0f = 0xC0000000: the sign bit is bit 31 of the low word, the int64 stays positive.
    assert trans_quant_param(torch.tensor([-2.0])).item() == 0x4000_C000_0000
    # -0.1f = 0xBDCCCCCD -> 0xBDCCC000.
    assert trans_quant_param(torch.tensor([-0.1])).item() == 0x4000_BDCC_C000
    scale, _ = unpack_quant_param(trans_quant_param(torch.tensor([-2.0, -0.1])))
    assert scale.tolist() == [-2.0, -0.0999755859375]


@pytest.mark.parametrize(
    ("offset", "packed", "unpacked"),
    [
        # 9-bit two's complement at bits 37..45: -3 -> 0x1FD; 0x1FD << 37 = 0x3FA0_0000_0000.
        (-3.0, 0x7FA0_3F80_0000, -3.0),
        (255.0, 0x5FE0_3F80_0000, 255.0),  # 0xFF << 37 = 0x1FE0_0000_0000
        (300.0, 0x5FE0_3F80_0000, 255.0),  # clamped to 255
        (-256.0, 0x6000_3F80_0000, -256.0),  # 0x100 << 37 = 0x2000_0000_0000
        (-1000.0, 0x6000_3F80_0000, -256.0),  # clamped to -256
        (2.5, 0x4040_3F80_0000, 2.0),  # rint: half to even -> 2; 2 << 37 = 0x40_0000_0000
        (3.5, 0x4080_3F80_0000, 4.0),  # -> 4
        (-2.5, 0x7FC0_3F80_0000, -2.0),  # -> -2 = 0x1FE
        (0.0, 0x4000_3F80_0000, 0.0),
    ],
)
def test_offsets(offset: float, packed: int, unpacked: float) -> None:
    out = trans_quant_param(torch.tensor([1.0]), torch.tensor([offset]))
    assert out.item() == packed, hex(out.item())
    scale, off = unpack_quant_param(out)
    assert scale.item() == 1.0 and off.item() == unpacked


def test_broadcast_scale_1_offset_n() -> None:
    out = trans_quant_param(torch.tensor([1.0]), torch.tensor([-3.0, 255.0, 2.5]))
    assert out.shape == (3,)
    assert out.tolist() == [0x7FA0_3F80_0000, 0x5FE0_3F80_0000, 0x4040_3F80_0000]


def test_broadcast_scale_n_offset_1() -> None:
    out = trans_quant_param(torch.tensor([1.0, -2.0, 0.1]), torch.tensor([-3.0]))
    assert out.shape == (3,)
    off_bits = 0x3FA0_0000_0000
    assert out.tolist() == [
        FLAG | off_bits | 0x3F80_0000,
        FLAG | off_bits | 0xC000_0000,
        FLAG | off_bits | 0x3DCC_C000,
    ]


def test_no_offset_keeps_scale_shape() -> None:
    s = torch.tensor([[0.5, 0.25]])
    assert trans_quant_param(s).shape == (1, 2)


def test_uint64_input_unpacks() -> None:
    packed = trans_quant_param(torch.tensor([1.0, -2.0]), torch.tensor([-3.0, 7.0]))
    scale, off = unpack_quant_param(packed.view(torch.uint64))
    assert scale.tolist() == [1.0, -2.0] and off.tolist() == [-3.0, 7.0]


def test_other_float_scale_dtypes_are_cast() -> None:
    s = torch.tensor([0.1], dtype=torch.bfloat16)
    assert trans_quant_param(s).item() == FLAG | (_bits_of(float(s.item())) & 0xFFFFE000)


def test_errors() -> None:
    with pytest.raises(TypeError, match="scale"):
        trans_quant_param(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(TypeError, match="scale"):
        trans_quant_param([1.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="offset"):
        trans_quant_param(torch.tensor([1.0]), 3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="broadcast"):
        trans_quant_param(torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        trans_quant_param(torch.ones(1), torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="packed"):
        unpack_quant_param(torch.ones(2))


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=8))
def test_round_trip_any_bit_pattern(bits: list[int]) -> None:
    """unpack(trans(s)) == s with its low 13 mantissa bits cleared, for every float32 pattern
    (normals, subnormals, +-0, inf, NaN payloads)."""
    s = _scale_from_bits(bits)
    packed = trans_quant_param(s)
    assert packed.tolist() == [FLAG | (b & 0xFFFFE000) for b in bits]
    scale, off = unpack_quant_param(packed)
    got = [v & 0xFFFFFFFF for v in scale.view(torch.int32).tolist()]
    assert got == [b & 0xFFFFE000 for b in bits]
    assert not off.any()


@settings(max_examples=200, deadline=None)
@given(
    scale=st.floats(width=32, allow_nan=False),
    offset=st.floats(-1000, 1000, width=32),
)
def test_round_trip_offset(scale: float, offset: float) -> None:
    packed = trans_quant_param(torch.tensor([scale]), torch.tensor([offset]))
    want_off = min(max(round(offset), -256), 255)  # Python round(): half to even
    assert packed.item() == FLAG | ((want_off & 0x1FF) << 37) | (_bits_of(scale) & 0xFFFFE000)
    s, o = unpack_quant_param(packed)
    assert s.item() == _f32_from_bits(_bits_of(scale) & 0xFFFFE000)
    assert o.item() == want_off


def test_unpack_clears_low_mantissa_bits_of_a_raw_int64() -> None:
    """A raw int64 scale (not made by trans_quant_param) with its low 13 bits set is read as the
    kernel reads it: those bits cleared."""
    bits = _bits_of(0.1)  # 0x3DCCCCCD: low 13 bits 0x0CCD
    assert bits & 0x1FFF
    packed = torch.tensor([bits | (1 << 46), bits], dtype=torch.int64)
    scale, off = unpack_quant_param(packed)
    want = _f32_from_bits(bits & 0xFFFFE000)
    assert scale.tolist() == [want, want] and want != _f32_from_bits(bits)
    assert off.tolist() == [0.0, 0.0]
    u_scale, _ = unpack_quant_param(packed.view(torch.uint64))
    assert u_scale.tolist() == [want, want]
