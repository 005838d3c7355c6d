"""Helper kernels of ascend_ops.kernels against float64 references written here (KERNELS.md).

Tolerances: integer results (quantize, dynamic_quant on exactly representable inputs, W8A8
accumulators, int8 requant) are compared exactly. Float outputs are compared with the float64
reference rounded once to the output dtype; the kernels accumulate in fp32, so an element may
differ by one output ulp where the exact value sits next to a rounding boundary.
"""

from __future__ import annotations

import pytest
import torch

from ascend_ops import _portable
from ascend_ops.kernels import (
    antiquant_weight,
    dynamic_quant,
    fp_matmul,
    prepare_w8a16_weight,
    quant_matmul,
    quantize,
    weight_quant_matmul,
)
from ascend_ops.quant_param import trans_quant_param

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _i8(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=_gen(seed), dtype=torch.int8)


def _assert_within_ulp(got: torch.Tensor, ref64: torch.Tensor, max_frac: float = 0.02) -> None:
    """got == ref64 rounded once to got's dtype, up to 1 ulp on a small fraction of elements."""
    want = ref64.to(got.dtype)
    diff = (got.double() - want.double()).abs()
    ulp = ULP[got.dtype] * want.double().abs().clamp_min(2.0**-14)
    assert bool((diff <= ulp * 1.0001).all()), float((diff / ulp).max())
    assert float((got != want).double().mean()) <= max_frac


def _assert_rounded_then_x3(
    got: torch.Tensor, pre64: torch.Tensor, x3: torch.Tensor, max_frac: float = 0.02
) -> None:
    """got == the kernel's order in float64: round(pre64) to got's dtype, + x3 exactly, round
    again; up to 1 ulp of the pre-x3 value on a small fraction of elements (fp32 summation)."""
    dt = got.dtype
    want = (pre64.to(dt).double() + x3.double()).to(dt)
    diff = (got.double() - want.double()).abs()
    ulp = ULP[dt] * (pre64.abs() + want.double().abs()).clamp_min(2.0**-14)
    assert bool((diff <= ulp * 1.0001).all()), float((diff / ulp).max())
    assert float((got != want).double().mean()) <= max_frac


# --- quantize ---------------------------------------------------------------------------------


def test_quantize_half_to_even_and_saturation() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 200.0, -200.0, 127.5, -128.5, 126.5])
    got = quantize(x, torch.tensor([1.0]))
    assert got.dtype == torch.int8
    assert got.tolist() == [0, 2, 2, 0, -2, -2, 127, -128, 127, -128, 126]


def test_quantize_per_tensor_with_offset() -> None:
    # x / 0.5 + 3: 0.25 -> 3.5 -> 4, -0.75 -> 1.5 -> 2, 1.25 -> 5.5 -> 6, -1.75 -> -0.5 -> -0.
    x = torch.tensor([[0.25, -0.75], [1.25, -1.75]], dtype=torch.bfloat16)
    got = quantize(x, torch.tensor([0.5]), torch.tensor([3.0]))
    assert got.tolist() == [[4, 2], [6, 0]]
    # div_mode=False multiplies: x * 2 + 3 gives the same values.
    assert quantize(x, torch.tensor([2.0]), torch.tensor([3.0]), div_mode=False).tolist() == [
        [4, 2],
        [6, 0],
    ]


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_channel_vs_float64(axis: int, dtype: torch.dtype) -> None:
    # bf16-representable inputs and power-of-two scales: x / s + zp is exact in fp32 and f64.
    x = (torch.randn(6, 24, generator=_gen(1)) * 40).to(torch.bfloat16).to(dtype)
    scales = 2.0 ** torch.randint(-3, 3, (24,), generator=_gen(2)).float()
    zps = torch.randint(-20, 20, (24,), generator=_gen(3)).float()
    ref = torch.round(x.double() / scales.double() + zps.double()).clamp(-128, 127)
    assert torch.equal(quantize(x, scales, zps, axis=axis), ref.to(torch.int8))
    ref_mul = torch.round(x.double() * scales.double() + zps.double()).clamp(-128, 127)
    got_mul = quantize(x, scales, zps, axis=axis, div_mode=False)
    assert torch.equal(got_mul, ref_mul.to(torch.int8))


def test_quantize_axis0() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert quantize(x, torch.tensor([1.0, 0.5]), axis=0).tolist() == [[1, 2], [6, 8]]


def test_quantize_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="int8"):
        quantize(torch.zeros(2), torch.ones(1), dtype=torch.int32)


# --- dynamic_quant ----------------------------------------------------------------------------


def test_dynamic_quant_hand_example() -> None:
    # rowmax 2 -> inv 63.5: [1, -2, 0.5, 2] * 63.5 = [63.5, -127, 31.75, 127] -> [64, -127, 32, 127]
    x = torch.tensor([[1.0, -2.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    y, s = dynamic_quant(x)
    assert y.tolist() == [[64, -127, 32, 127], [0, 0, 0, 0]]
    assert s.dtype == torch.float32 and s.shape == (2,)
    assert s[0].item() == torch.tensor(1.0 / 63.5, dtype=torch.float32).item()  # 1 / inv
    assert s[1].item() == 1.0  # a zero row gets scale 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dynamic_quant_vs_float64(dtype: torch.dtype) -> None:
    x = (torch.randn(2, 3, 64, generator=_gen(4)) * 3).to(dtype)
    smooth = (torch.rand(64, generator=_gen(5)) + 0.5).to(dtype)
    for sm in (None, smooth):
        xs = x.double() * (1.0 if sm is None else sm.double())
        rowmax = xs.abs().amax(-1, keepdim=True)
        ref_y = torch.round(xs * (127.0 / rowmax)).clamp(-128, 127)
        y, s = dynamic_quant(x, smooth_scales=sm)
        assert y.shape == x.shape and s.shape == (2, 3)
        # fp32 vs f64 products may fall on opposite sides of a .5 tie: at most 1 apart, rarely.
        d = (y.double() - ref_y).abs()
        assert float(d.max()) <= 1 and float((d > 0).double().mean()) < 0.01
        assert torch.allclose(s.double(), (rowmax / 127.0).squeeze(-1), rtol=1e-6, atol=0)
        assert int(y.abs().max()) == 127


# --- quant_matmul (W8A8) ----------------------------------------------------------------------


def _w8a8_data(m: int = 5, k: int = 48, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    return _i8((m, k), 6), _i8((k, n), 7)


def _acc64(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return x1.double() @ x2.double()  # exact: |sum| < 2^53


def test_quant_matmul_packed_scale_int32_bias() -> None:
    x1, x2 = _w8a8_data()
    bias = torch.randint(-5000, 5000, (24,), generator=_gen(8), dtype=torch.int32)
    s = torch.rand(24, generator=_gen(9)) * 1e-3 + 1e-4
    packed = trans_quant_param(s)
    s_trunc = (s.view(torch.int32) & ~0x1FFF).view(torch.float32)  # low 13 bits cleared
    got = quant_matmul(x1, x2, packed, bias=bias)
    assert got.dtype == torch.float16  # int64 scale -> fp16
    ref = (_acc64(x1, x2) + bias.double()) * s_trunc.double()
    assert torch.equal(got, ref.float().to(torch.float16))  # one fp32 product: exact


def test_quant_matmul_float32_scale_truncated_without_pertoken() -> None:
    x1, x2 = _w8a8_data()
    s = torch.full((24,), 0.1)  # 0x3DCCCCCD -> 0.0999755859375 after packing
    got = quant_matmul(x1, x2, s)
    assert got.dtype == torch.float16
    assert torch.equal(got, (_acc64(x1, x2) * 0.0999755859375).float().to(torch.float16))


def test_quant_matmul_float32_scale_with_pertoken() -> None:
    x1, x2 = _w8a8_data(m=7)
    s = torch.rand(24, generator=_gen(10)) * 1e-2
    pt = torch.rand(7, generator=_gen(11)) + 0.5
    got = quant_matmul(x1, x2, s, pertoken_scale=pt)
    assert got.dtype == torch.float16  # float32 + pertoken -> fp16, scale NOT truncated
    ref = _acc64(x1, x2) * s.double() * pt.double().reshape(-1, 1)
    _assert_within_ulp(got, ref)


def test_quant_matmul_bf16_scale_and_output_table() -> None:
    x1, x2 = _w8a8_data()
    s = (torch.rand(24, generator=_gen(12)) * 1e-2).to(torch.bfloat16)
    got = quant_matmul(x1, x2, s)
    assert got.dtype == torch.bfloat16
    _assert_within_ulp(got, _acc64(x1, x2) * s.double())
    pt = torch.rand(5, generator=_gen(13)) + 0.5
    got_pt = quant_matmul(x1, x2, s, pertoken_scale=pt)
    assert got_pt.dtype == torch.bfloat16
    _assert_within_ulp(got_pt, _acc64(x1, x2) * s.double() * pt.double().reshape(-1, 1))
    # explicit output dtype wins over the table
    assert quant_matmul(x1, x2, s.float(), output_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_quant_matmul_float_bias_after_scaling_and_x3() -> None:
    x1, x2 = _w8a8_data()
    s = (torch.rand(24, generator=_gen(14)) * 1e-2).to(torch.bfloat16)
    bias = torch.randn(24, generator=_gen(15)).to(torch.bfloat16)
    x3 = torch.randn(5, 24, generator=_gen(16)).to(torch.bfloat16)
    got = quant_matmul(x1, x2, s, bias=bias, x3=x3)
    _assert_rounded_then_x3(got, _acc64(x1, x2) * s.double() + bias.double(), x3)


def test_quant_matmul_3d_and_per_tensor_scale() -> None:
    x1 = _i8((2, 3, 16), 17)
    x2 = _i8((16, 8), 18)
    packed = trans_quant_param(torch.tensor([0.5]))
    got = quant_matmul(x1, x2, packed)
    assert got.shape == (2, 3, 8)
    assert torch.equal(got, (_acc64(x1, x2) * 0.5).to(torch.float16))


def test_quant_matmul_int8_requant() -> None:
    x1, x2 = _w8a8_data(k=16)
    s = torch.full((24,), 2.0**-6)
    packed = trans_quant_param(s, torch.tensor([3.0]))
    got = quant_matmul(x1, x2, packed, output_dtype=torch.int8)
    ref = torch.round(_acc64(x1, x2) * 2.0**-6 + 3.0).clamp(-128, 127)
    assert got.dtype == torch.int8 and torch.equal(got, ref.to(torch.int8))
    assert int(got.max()) == 127 and int(got.min()) == -128  # saturation is exercised
    # explicit float offset instead of the packed one
    got2 = quant_matmul(x1, x2, s, offset=torch.tensor([-2.0]), output_dtype=torch.int8)
    ref2 = torch.round(_acc64(x1, x2) * 2.0**-6 - 2.0).clamp(-128, 127)
    assert torch.equal(got2, ref2.to(torch.int8))


# --- weight_quant_matmul (W8A16) --------------------------------------------------------------


def _golden_w8a16(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    group: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 reference with the vendor golden's two roundings of the dequantized weight."""
    k = w.shape[0]

    def expand(p: torch.Tensor) -> torch.Tensor:
        p = p.double()
        if group:
            return p.repeat_interleave(group, 0)[:k]
        return p.reshape(1, -1)

    wd = w.double()
    if offset is not None:
        wd = wd + expand(offset)
    wd = wd.to(x.dtype).double() * expand(scale)
    v = x.double() @ wd.to(x.dtype).double()
    return v if bias is None else v + bias.double()


CASES = [
    ("per-tensor", (1,), 0),
    ("per-channel", (16,), 0),
    ("per-channel-2d", (1, 16), 0),
    ("per-group", (3, 16), 32),  # k = 80 -> ceil(80/32) = 3 groups
]


@pytest.mark.parametrize(("name", "sshape", "group"), CASES)
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_quant_matmul_vs_float64(
    name: str, sshape: tuple[int, ...], group: int, with_offset: bool, dtype: torch.dtype
) -> None:
    k, n = 80, 16
    x = torch.randn(3, k, generator=_gen(20)).to(dtype)
    w = _i8((k, n), 21)
    scale = (torch.rand(sshape, generator=_gen(22)) * 0.02 + 1e-3).to(dtype)
    offset = (
        torch.randint(-8, 8, sshape, generator=_gen(23)).to(dtype) + 0.5 if with_offset else None
    )
    bias = torch.randn(n, generator=_gen(24)).to(dtype)
    got = weight_quant_matmul(x, w, scale, offset, bias, group)
    assert got.dtype == dtype and got.shape == (3, n)
    _assert_within_ulp(got, _golden_w8a16(x, w, scale, offset, group, bias))


def test_dequantize_weight_rounds_twice() -> None:
    # (w + offset) rounded to bf16, then * scale rounded to bf16 (8 significant bits):
    # 127 + 0.5 = 127.5 is exact; 127.5 * 3 = 382.5 lies between 382 and 384 -> 382.
    w = torch.tensor([[127]], dtype=torch.int8)
    out = antiquant_weight(
        w, torch.tensor([3.0], dtype=torch.bfloat16), torch.tensor([0.5], dtype=torch.bfloat16)
    )
    assert out.dtype == torch.bfloat16 and out.item() == 382.0


def test_weight_quant_matmul_3d_x_and_x3() -> None:
    x = torch.randn(2, 3, 32, generator=_gen(25)).to(torch.bfloat16)
    w = _i8((32, 8), 26)
    scale = (torch.rand(8, generator=_gen(27)) * 0.02).to(torch.bfloat16)
    x3 = torch.randn(2, 3, 8, generator=_gen(28)).to(torch.bfloat16)
    got = weight_quant_matmul(x, w, scale, x3=x3)
    assert got.shape == (2, 3, 8)
    pre = _golden_w8a16(x.reshape(6, 32), w, scale, None, 0).reshape(2, 3, 8)
    _assert_rounded_then_x3(got, pre, x3)


# --- fast paths == reference paths ------------------------------------------------------------


def test_prepare_w8a16_weight_layout() -> None:
    w = _i8((64, 16), 29)
    p = prepare_w8a16_weight(w)
    assert p.shape == (64, 16) and torch.equal(p, w) and p.t().is_contiguous()
    assert prepare_w8a16_weight(p) is p
    with pytest.raises(ValueError, match="2-D"):
        prepare_w8a16_weight(torch.zeros(3, dtype=torch.int8))


@pytest.mark.parametrize("sshape", [(1,), (48,), (1, 48)])
@pytest.mark.parametrize("m", [1, 7])
def test_w8a16_fast_path_vs_golden(sshape: tuple[int, ...], m: int) -> None:
    """Fast path (torch._weight_int8pack_mm) vs the golden: within the documented bound
    2^-9 * sum_k |x w s| + 1 ulp; exactly equal to the fp32 value of x @ (w * s) rounded once."""
    k, n = 256, 48
    x = torch.randn(m, k, generator=_gen(30)).to(torch.bfloat16)
    w = _i8((k, n), 31)
    scale = (torch.rand(sshape, generator=_gen(32)) * 0.02 + 1e-3).to(torch.bfloat16)
    wp = prepare_w8a16_weight(w)
    assert _portable._int8pack_ok(x, wp, scale, None, 0)
    assert not _portable._int8pack_ok(x, w, scale, None, 0)  # plain (k, n) layout: golden
    fast = weight_quant_matmul(x, wp, scale)
    gold = weight_quant_matmul(x, w, scale)
    s = scale.double().reshape(1, -1)
    bound = 2.0**-9 * (x.double().abs() @ w.double().abs()) * s.abs()
    bound = bound + ULP[torch.bfloat16] * fast.double().abs() + ULP[torch.bfloat16] * 2.0**-14
    assert bool(((fast.double() - gold.double()).abs() <= bound * 1.0001).all())
    exact = (x.double() @ w.double()) * s  # what the fast path approximates in fp32
    _assert_within_ulp(fast, exact)


def test_w8a16_fast_path_with_bias_and_x3() -> None:
    k, n, m = 64, 32, 4
    x = torch.randn(m, k, generator=_gen(33)).to(torch.bfloat16)
    w = prepare_w8a16_weight(_i8((k, n), 34))
    scale = torch.full((n,), 2.0**-7, dtype=torch.bfloat16)  # power of two: no w*s rounding
    bias = torch.randn(n, generator=_gen(35)).to(torch.bfloat16)
    x3 = torch.randn(m, n, generator=_gen(36)).to(torch.bfloat16)
    got = weight_quant_matmul(x, w, scale, bias=bias, x3=x3)
    pre = _golden_w8a16(x, w, scale, None, 0, bias)
    # the fast path rounds before adding the bias: one more output ulp before x3
    want = (pre.to(torch.bfloat16).double() + x3.double()).to(torch.bfloat16).double()
    diff = (got.double() - want).abs()
    bound = 2 * ULP[torch.bfloat16] * (pre.abs() + want.abs()).clamp_min(1.0)
    assert bool((diff <= bound).all())


def test_w8a16_fast_path_not_used_outside_its_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 64, generator=_gen(37)).to(torch.bfloat16)
    w = prepare_w8a16_weight(_i8((64, 32), 38))
    s = torch.rand(32, generator=_gen(39)).to(torch.bfloat16)
    off = torch.ones(32, dtype=torch.bfloat16)
    assert not _portable._int8pack_ok(x, w, s, off, 0)  # asymmetric
    assert not _portable._int8pack_ok(x, w, s.reshape(1, 32).expand(2, 32), None, 32)  # grouped
    assert not _portable._int8pack_ok(x.half(), w, s.half(), None, 0)  # fp16 kernel is slow
    monkeypatch.setattr(_portable, "W8A16_INT8PACK_MAX_M", 3)
    assert not _portable._int8pack_ok(x, w, s, None, 0)  # m above the measured switch


@pytest.mark.parametrize(("k", "n"), [(8, 2), (8, 3), (8, 16), (24, 5), (40, 3), (136, 7)])
def test_w8a16_k_off_the_kernels_block_takes_the_golden(k: int, n: int) -> None:
    """k that is not a multiple of 16 crashes or corrupts torch._weight_int8pack_mm on some CPUs
    (AMX): such weights take the golden path, and the result matches it exactly."""
    x = torch.randn(1, k, generator=_gen(41)).to(torch.bfloat16)
    w = prepare_w8a16_weight(_i8((k, n), 42))
    s = torch.rand(1, generator=_gen(43)).to(torch.bfloat16) + 0.5
    assert not _portable._int8pack_ok(x, w, s, None, 0)
    got = _portable.weight_quant_matmul(x, w, s)
    assert torch.equal(got, _golden_w8a16(x, w, s, None, 0, None).to(torch.bfloat16))


@pytest.mark.parametrize("m", [3, 40])  # below / above BF16_GEMM_MAX_M
@pytest.mark.parametrize("terms", ["none", "bias", "x3", "both", "bias_f32"])
def test_fp_matmul_bf16_rounding_order(m: int, terms: str) -> None:
    """x @ w + bias is rounded once (<= 1 ulp on a few elements vs the f64 value rounded once,
    whereas rounding twice would disagree on many); x3 is then added to that rounded value and
    rounded again, as the kernel's AddX3 does."""
    k, n = 96, 40
    x = torch.randn(m, k, generator=_gen(40)).to(torch.bfloat16)
    w = torch.randn(k, n, generator=_gen(41)).to(torch.bfloat16)
    bias = torch.randn(n, generator=_gen(42)).to(torch.bfloat16)
    x3 = torch.randn(m, n, generator=_gen(43)).to(torch.bfloat16)
    b = {"bias": bias, "both": bias, "bias_f32": bias.float() + 2.0**-12}.get(terms)
    t3 = x3 if terms in ("x3", "both") else None
    ref = x.double() @ w.double()
    if b is not None:
        ref = ref + b.double()
    got = fp_matmul(x, w, b, t3)
    assert got.dtype == torch.bfloat16
    if t3 is None:
        _assert_within_ulp(got, ref)
    else:
        _assert_rounded_then_x3(got, ref, t3)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_x3_added_after_rounding_differs_from_one_rounding(dt: torch.dtype) -> None:
    """The rounding order is observable: with x3 of the magnitude of the product,
    the kernel order (round, add, round) and a single rounding disagree on many elements, and
    every scenario follows the kernel order exactly (fp16 adds in half, bf16 in fp32)."""
    m, k, n = 8, 32, 16
    x = (torch.randn(m, k, generator=_gen(90)) * 0.1).to(dt)
    w = (torch.randn(k, n, generator=_gen(91)) * 0.1).to(dt)
    x3 = (torch.randn(m, n, generator=_gen(92)) * 0.05).to(dt)
    pre = x.double() @ w.double()
    kernel = (pre.to(dt).double() + x3.double()).to(dt)
    once = (pre + x3.double()).to(dt)
    assert float((kernel != once).double().mean()) > 0.15
    _assert_rounded_then_x3(fp_matmul(x, w, None, x3), pre, x3)
    wi = _i8((k, n), 93)
    s = torch.full((n,), 2.0**-9, dtype=dt)
    pre_w = x.double() @ (wi.double() * 2.0**-9)
    _assert_rounded_then_x3(weight_quant_matmul(x, wi, s, x3=x3), pre_w, x3)
    x1 = _i8((m, k), 94)
    ds = torch.full((n,), 2.0**-12, dtype=torch.bfloat16)
    x3b = (torch.randn(m, n, generator=_gen(95)) * 8).to(torch.bfloat16)
    pre_q = _acc64(x1, wi) * 2.0**-12
    _assert_rounded_then_x3(quant_matmul(x1, wi, ds, x3=x3b), pre_q, x3b)


def test_fp_matmul_fp16_and_fp32() -> None:
    x = torch.randn(2, 3, 16, generator=_gen(44))
    w = torch.randn(16, 8, generator=_gen(45))
    bias = torch.randn(8, generator=_gen(46))
    got32 = fp_matmul(x, w, bias)
    assert got32.shape == (2, 3, 8)
    assert torch.allclose(got32.double(), x.double() @ w.double() + bias.double(), atol=1e-5)
    got16 = fp_matmul(x.half(), w.half(), bias.half())
    _assert_within_ulp(got16, x.half().double() @ w.half().double() + bias.half().double())


def test_int_mm_cpu_chunked_path_is_exact() -> None:
    """Above W8A8_INT_MM_MAX_M rows the CPU int8 GEMM runs as fp32 GEMMs on k-chunks of 1024:
    still exact int32, including the worst case (all -128: partial sums of exactly 2^24)."""
    from ascend_ops import _portable as K

    g = torch.Generator().manual_seed(3)
    m, k, n = K.W8A8_INT_MM_MAX_M + 3, 2 * 1024 + 37, 33
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).t()
    a[0] = -128
    b[:, 0] = -128
    ref = (a.long() @ b.long()).to(torch.int32)
    assert torch.equal(K._int_mm(a, b), ref)
    assert torch.equal(K._int_mm(a[:1], b), ref[:1])
