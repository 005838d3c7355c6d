"""Tests of the strict torch_npu double itself, against hand-computed expectations."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import npu_double
import pytest
import torch
import torch.distributed as dist
from mp_harness import destroy_group_cleanly, run_ranks
from npu_double import (
    FORMAT_FRACTAL_NZ,
    FORMAT_ND,
    SINGLE_PROCESS_HCOM,
    DoubleContractError,
    TorchNpuDouble,
)

HC = SINGLE_PROCESS_HCOM
FLAG = 1 << 46


@pytest.fixture
def tnpu(torch_npu_double: TorchNpuDouble) -> TorchNpuDouble:
    """The double, imported the way library code imports it."""
    import torch_npu

    assert torch_npu is torch_npu_double
    return torch_npu


@pytest.fixture
def gloo_world1() -> Iterator[None]:
    """An initialized single-rank gloo default group (destroyed afterwards)."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            destroy_group_cleanly()


# ------------------------------------------------------------------ npu_trans_quant_param


def test_trans_quant_param_bit_patterns(tnpu: TorchNpuDouble) -> None:
    s = torch.tensor([1.0, -1.0, 0.1, 2.0], dtype=torch.float32)
    got = tnpu.npu_trans_quant_param(s).tolist()
    assert got[0] == 0x40003F800000  # 0x3F800000 | 1 << 46
    assert got[1] == 0x4000BF800000  # sign bit kept as bit 31 of an unsigned 32-bit field
    assert got[2] == 0x3DCCC000 | FLAG  # 0.1 = 0x3DCCCCCD, low 13 bits dropped
    assert got[3] == 0x40000000 | FLAG
    assert tnpu.npu_trans_quant_param(s).dtype == torch.int64


def test_trans_quant_param_offsets_and_broadcast(tnpu: TorchNpuDouble) -> None:
    s = torch.tensor([1.0], dtype=torch.float32)
    off = torch.tensor([-3.0, 255.0, 300.0, -300.0, 2.5, 3.5], dtype=torch.float32)
    got = tnpu.npu_trans_quant_param(s, off).tolist()
    base = 0x3F800000 | FLAG
    assert len(got) == 6  # broadcast of (1,) scale with (6,) offset
    assert got[0] == base | (0x1FD << 37)  # -3 -> 9-bit two's complement 0x1FD
    assert got[1] == base | (0xFF << 37)
    assert got[2] == base | (0xFF << 37)  # 300 clamps to 255
    assert got[3] == base | (0x100 << 37)  # -300 clamps to -256
    assert got[4] == base | (2 << 37)  # rint(2.5) = 2 (half to even)
    assert got[5] == base | (4 << 37)
    # 2-D (1, n) scale with matching offset keeps its shape
    s2 = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    assert tnpu.npu_trans_quant_param(s2, torch.zeros(1, 2)).shape == (1, 2)


def test_trans_quant_param_round_mode_1(tnpu: TorchNpuDouble) -> None:
    bits = torch.tensor([0x3F801800, 0x3F801000, 0x3F803000], dtype=torch.int32)
    got = tnpu.npu_trans_quant_param(bits.view(torch.float32), round_mode=1).tolist()
    assert [g & 0xFFFFFFFF for g in got] == [0x3F802000, 0x3F800000, 0x3F804000]
    got0 = tnpu.npu_trans_quant_param(bits.view(torch.float32)).tolist()
    assert [g & 0xFFFFFFFF for g in got0] == [0x3F800000, 0x3F800000, 0x3F802000]


# ------------------------------------------------------------------ npu_quantize / dynamic


def test_quantize_rint_half_even_and_saturation(tnpu: TorchNpuDouble) -> None:
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0, 3.49]])
    y = tnpu.npu_quantize(x, torch.tensor([1.0]), None, torch.qint8)
    assert y.dtype == torch.int8
    assert y.tolist() == [[0, 2, 2, 0, -2, 127, -128, 3]]
    # div_mode: x / 0.5 + zp
    y = tnpu.npu_quantize(
        torch.tensor([[1.25, -1.25]]), torch.tensor([0.5]), torch.tensor([1], dtype=torch.int8),
        torch.qint8,
    )  # fmt: skip
    assert y.tolist() == [[4, -2]]  # 2.5 + 1 = 3.5 -> 4 ; -2.5 + 1 = -1.5 -> -2


def test_quantize_mul_mode_per_channel(tnpu: TorchNpuDouble) -> None:
    x = torch.tensor([[1.0, 1.0, 1.0], [2.0, -2.0, 0.25]], dtype=torch.bfloat16)
    s = torch.tensor([2.0, 0.5, 10.0], dtype=torch.bfloat16)
    zp = torch.tensor([0.0, 1.0, 0.0], dtype=torch.bfloat16)
    y = tnpu.npu_quantize(x, s, zp, torch.qint8, -1, False)
    assert y.tolist() == [[2, 2, 10], [4, 0, 2]]  # 0.5+1 -> 2 ; -1+1 -> 0 ; 2.5 -> 2


def test_dynamic_quant(tnpu: TorchNpuDouble) -> None:
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    y, scale = tnpu.npu_dynamic_quant(x)
    # inv = 127/4 = 31.75: [31.75, -63.5, 15.875, 127] -> rint -> [32, -64, 16, 127]
    assert y.dtype == torch.int8 and scale.dtype == torch.float32
    assert y.tolist() == [[32, -64, 16, 127], [0, 0, 0, 0]]
    assert scale.shape == (2,)
    assert scale[0].item() == pytest.approx(4 / 127, rel=1e-6)
    assert scale[1].item() == 1.0  # zero row
    y3, s3 = tnpu.npu_dynamic_quant(torch.ones(2, 3, 8, dtype=torch.float16))
    assert y3.shape == (2, 3, 8) and s3.shape == (2, 3) and bool((y3 == 127).all())
    sm = torch.tensor([1.0, 1.0, 1.0, 0.5], dtype=torch.bfloat16)
    y, scale = tnpu.npu_dynamic_quant(x[:1], smooth_scales=sm)  # row becomes [1,-2,.5,2]
    assert y.tolist() == [[64, -127, 32, 127]]  # inv = 63.5: 63.5 -> 64, 31.75 -> 32


# ------------------------------------------------------------------ npu_quant_matmul


def test_quant_matmul_int32_bias_before_scale(tnpu: TorchNpuDouble) -> None:
    x1 = torch.tensor([[1, 2], [3, -4]], dtype=torch.int8)
    x2 = torch.tensor([[5, 6], [7, -8]], dtype=torch.int8)
    # x1 @ x2 = [[19, -10], [-13, 50]]
    bias = torch.tensor([1, 10], dtype=torch.int32)
    scale = torch.tensor([0.5, 2.0], dtype=torch.bfloat16)
    out = tnpu.npu_quant_matmul(x1, x2, scale, bias=bias, output_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert out.float().tolist() == [[10.0, 0.0], [-6.0, 120.0]]  # (acc + bias) * scale
    # float bias is added after the scale
    fb = torch.tensor([1.0, 10.0], dtype=torch.float32)
    out = tnpu.npu_quant_matmul(x1, x2, scale, bias=fb, output_dtype=torch.bfloat16)
    assert out.float().tolist() == [[10.5, -10.0], [-5.5, 110.0]]
    # int64 packed scale -> fp16, and pertoken with float32 scale -> fp16
    packed = tnpu.npu_trans_quant_param(torch.tensor([0.25], dtype=torch.float32))
    out = tnpu.npu_quant_matmul(x1, x2, packed, bias=bias, output_dtype=torch.float16)
    assert out.dtype == torch.float16 and out.tolist() == [[5.0, 0.0], [-3.0, 15.0]]
    pt = torch.tensor([1.0, 2.0], dtype=torch.float32)
    out = tnpu.npu_quant_matmul(
        x1, x2, torch.tensor([1.0]), pertoken_scale=pt, output_dtype=torch.float16
    )
    assert out.tolist() == [[19.0, -10.0], [-26.0, 100.0]]
    # default output int8 with saturation and offset
    out = tnpu.npu_quant_matmul(x1, x2, torch.tensor([10.0]), offset=torch.tensor([1.0]))
    assert out.dtype == torch.int8 and out.tolist() == [[127, -99], [-128, 127]]


def test_quant_matmul_fp32_scale_fp16_is_truncated(tnpu: TorchNpuDouble) -> None:
    x1 = torch.ones(1, 1, dtype=torch.int8)
    x2 = torch.full((1, 1), 100, dtype=torch.int8)
    s = torch.tensor([0x3DCCCCCD], dtype=torch.int32).view(torch.float32)  # 0.1
    out = tnpu.npu_quant_matmul(x1, x2, s, output_dtype=torch.float16)
    trunc = torch.tensor([0x3DCCC000], dtype=torch.int32).view(torch.float32).double()
    assert out.item() == (100 * trunc).to(torch.float16).item()


# ------------------------------------------------------------------ weight_quant_batchmatmul


def test_weight_quant_batchmatmul_per_group(tnpu: TorchNpuDouble) -> None:
    k, n, g = 64, 2, 32
    w = torch.ones(k, n, dtype=torch.int8)
    w[32:] = 2
    x = torch.ones(1, k, dtype=torch.bfloat16)
    scale = torch.tensor([[0.5, 1.0], [2.0, 4.0]], dtype=torch.bfloat16)
    off = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.bfloat16)
    bias = torch.tensor([0.5, -0.5], dtype=torch.float32)
    y = tnpu.npu_weight_quant_batchmatmul(x, w, scale, off, bias=bias, antiquant_group_size=g)
    # col 0: 32*(1+1)*0.5 + 32*(2+0)*2 = 32 + 128 = 160 (+0.5)
    # col 1: 32*(1+0)*1 + 32*(2-1)*4 = 32 + 128 = 160 (-0.5)
    assert y.dtype == torch.bfloat16
    assert y.float().tolist() == [[160.0, 160.0]]  # 160.5 / 159.5 round to 160 in bf16
    y16 = tnpu.npu_weight_quant_batchmatmul(
        x.half(), w, scale.half(), off.half(), bias=bias.half(), antiquant_group_size=g
    )
    assert y16.dtype == torch.float16 and y16.float().tolist() == [[160.5, 159.5]]
    nz = tnpu.npu_format_cast(w, FORMAT_FRACTAL_NZ)
    y_nz = tnpu.npu_weight_quant_batchmatmul(x, nz, scale, off, bias=bias, antiquant_group_size=g)
    assert torch.equal(y, y_nz)


# ------------------------------------------------------------------ formats


def test_formats_follow_storage(tnpu: TorchNpuDouble) -> None:
    w = torch.randint(-5, 5, (32, 16), dtype=torch.int8)
    assert tnpu.get_npu_format(w) == FORMAT_ND and not tnpu.is_nz(w)
    nz = tnpu.npu_format_cast(w, FORMAT_FRACTAL_NZ)
    assert torch.equal(nz, w) and nz.data_ptr() != w.data_ptr()
    assert tnpu.get_npu_format(nz) == FORMAT_FRACTAL_NZ
    assert tnpu.is_nz(nz.t()) and tnpu.is_nz(torch.nn.Parameter(nz, requires_grad=False))
    assert tnpu.get_npu_format(tnpu.npu_format_cast(nz, FORMAT_ND)) == FORMAT_ND
    assert not tnpu.is_nz(nz.clone())
    with pytest.raises(DoubleContractError):
        tnpu.npu_format_cast(w, 3)


# ------------------------------------------------------------------ fused op, single process


def test_mm_all_reduce_fp_bf16_matches_float64(tnpu: TorchNpuDouble) -> None:
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, 3, 64, generator=g).bfloat16()
    x2 = torch.randn(64, 48, generator=g).bfloat16()
    bias = torch.randn(48, generator=g).bfloat16()
    x3 = torch.randn(2, 3, 48, generator=g).bfloat16()
    out = tnpu.npu_mm_all_reduce_base(x1, x2, HC, bias=bias, x3=x3)
    ref = x1.double() @ x2.double() + bias.double() + x3.double()
    assert out.shape == (2, 3, 48) and out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))
    # a transposed view of an (n, k) weight is accepted (C2)
    out_t = tnpu.npu_mm_all_reduce_base(x1, x2.t().contiguous().t(), HC, bias=bias, x3=x3)
    assert torch.equal(out_t, out)
    rec = tnpu.calls_named("npu_mm_all_reduce_base")[0]
    assert rec.args["x1"].shape == (2, 3, 64) and rec.args["x2"].format == FORMAT_ND
    assert rec.tensor("bias") is bias and rec.args["hcom"] == HC and rec.error is None


def _w8a16_ref(x1: torch.Tensor, w: torch.Tensor, s: torch.Tensor, o: torch.Tensor,
               g: int) -> torch.Tensor:  # fmt: skip
    k = w.shape[0]
    if g:
        s = s.repeat_interleave(g, 0)[:k]
        o = o.repeat_interleave(g, 0)[:k]
    dt = x1.dtype
    wd = ((w.float() + o.float()).to(dt).float() * s.float()).to(dt)
    return (x1.double() @ wd.double()).to(dt)


@pytest.mark.parametrize("group", [0, 32])
def test_mm_all_reduce_w8a16(tnpu: TorchNpuDouble, group: int) -> None:
    g = torch.Generator().manual_seed(1)
    k, n = 80, 24
    x1 = torch.randn(5, k, generator=g).bfloat16()
    w = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    rows = (k + group - 1) // group if group else 1
    s = (torch.rand(rows, n, generator=g) / 50).bfloat16()
    o = torch.randint(-3, 3, (rows, n), generator=g).bfloat16()
    out = tnpu.npu_mm_all_reduce_base(
        x1, tnpu.npu_format_cast(w, FORMAT_FRACTAL_NZ), HC,
        antiquant_scale=s, antiquant_offset=o, antiquant_group_size=group,
    )  # fmt: skip
    assert out.dtype == torch.bfloat16 and out.shape == (5, n)
    assert torch.equal(out, _w8a16_ref(x1, w, s, o, group))


def test_mm_all_reduce_w8a8(tnpu: TorchNpuDouble) -> None:
    g = torch.Generator().manual_seed(2)
    m, k, n = 6, 96, 16
    x1 = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    bias = torch.randint(-5000, 5000, (n,), generator=g, dtype=torch.int32)
    acc = x1.long() @ w.long() + bias.long()  # exact integer reference
    s32 = torch.rand(n, generator=g) / 1000
    x3 = torch.randn(m, n, generator=g).half()
    # int64 packed -> fp16 output, scale truncated to 19 bits
    packed = tnpu.npu_trans_quant_param(s32)
    out = tnpu.npu_mm_all_reduce_base(x1, w, HC, bias=bias, dequant_scale=packed, x3=x3)
    trunc = (s32.view(torch.int32) & ~0x1FFF).view(torch.float32)
    ref = acc.double() * trunc.double() + x3.double()
    assert out.dtype == torch.float16 and torch.equal(out, ref.to(torch.float16))
    # bf16 dequant + pertoken -> bf16
    sb = s32.bfloat16()
    pt = torch.rand(m, generator=g) + 0.5
    out = tnpu.npu_mm_all_reduce_base(x1, w, HC, bias=bias, dequant_scale=sb, pertoken_scale=pt)
    ref = acc.double() * sb.double() * pt.double().unsqueeze(1)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))
    # float32 dequant + pertoken -> fp16 (scale used as is)
    out = tnpu.npu_mm_all_reduce_base(x1, w, HC, dequant_scale=s32, pertoken_scale=pt)
    ref = (x1.long() @ w.long()).double() * s32.double() * pt.double().unsqueeze(1)
    assert out.dtype == torch.float16 and torch.equal(out, ref.to(torch.float16))


def test_mm_all_reduce_w8a8_comm_quant_world1(tnpu: TorchNpuDouble) -> None:
    x1 = torch.tensor([[1, 2], [3, 4]], dtype=torch.int8)
    w = torch.tensor([[10, 0], [0, 10]], dtype=torch.int8)  # acc = [[10, 20], [30, 40]]
    ds = torch.tensor([1.0], dtype=torch.bfloat16)
    s1 = torch.tensor([0.25, 0.5], dtype=torch.bfloat16)
    s2 = torch.tensor([1.0, 0.5], dtype=torch.bfloat16)
    out = tnpu.npu_mm_all_reduce_base(
        x1, w, HC, dequant_scale=ds, comm_quant_scale_1=s1, comm_quant_scale_2=s2
    )
    # a = sat(rint(v / s1)) = [[40, 40], [120, 80]]; r = sat(rint(a * s1 / s2)) = [[10, 40], [30, 80]]
    assert out.float().tolist() == [[10.0, 20.0], [30.0, 40.0]]
    s1 = torch.tensor([0.125, 0.5], dtype=torch.bfloat16)  # 30 / 0.125 = 240 saturates to 127
    out = tnpu.npu_mm_all_reduce_base(
        x1, w, HC, dequant_scale=ds, comm_quant_scale_1=s1, comm_quant_scale_2=s2
    )
    assert out.float().tolist() == [[10.0, 20.0], [16.0, 40.0]]  # 127 * 0.125 = 15.875 -> 16


# ------------------------------------------------------------------ violations


def _i8(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.int8)


def _bf(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.bfloat16)


def _h(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.float16)


def _packed(n: int = 1) -> torch.Tensor:
    return torch.full((n,), 0x3F800000 | FLAG, dtype=torch.int64)


def _nz(t: torch.Tensor) -> torch.Tensor:
    import torch_npu

    return torch_npu.npu_format_cast(t, FORMAT_FRACTAL_NZ)


# (id, rule expected in the message, x1, x2, kwargs) — hcom is the single-process name.
VIOLATIONS: list[tuple[str, str, Callable[[], tuple[Any, Any, dict[str, Any]]]]] = [
    ("x1_fp32", "C1", lambda: (torch.ones(4, 64), torch.ones(64, 8), {})),
    ("x1_1d", "C1", lambda: (_bf(64), _bf(64, 8), {})),
    ("x1_4d", "C1", lambda: (_bf(1, 1, 4, 64), _bf(64, 8), {})),
    ("x1_transposed", "C1", lambda: (_bf(64, 4).t(), _bf(64, 8), {})),
    ("x1_nz", "C1", lambda: (_nz(_bf(4, 64)), _bf(64, 8), {})),
    ("x2_3d", "C2", lambda: (_bf(4, 64), _bf(1, 64, 8), {})),
    ("x2_strided", "C2", lambda: (_bf(4, 64), _bf(64, 16)[:, ::2], {})),
    ("k_mismatch", "C3", lambda: (_bf(4, 64), _bf(32, 8), {})),
    ("dtype_mix_fp", "C2", lambda: (_bf(4, 64), _h(64, 8), {})),
    ("int8_x1_fp_x2", "C2", lambda: (_i8(4, 64), _bf(64, 8), {})),
    ("empty_x1", "C12", lambda: (_bf(0, 64), _bf(64, 8), {})),
    ("reduce_op_max", "C5", lambda: (_bf(4, 64), _bf(64, 8), {"reduce_op": "max"})),
    ("comm_turn_1", "C8", lambda: (_bf(4, 64), _bf(64, 8), {"comm_turn": 1})),
    ("fp_x2_nz", "C2", lambda: (_bf(4, 64), _nz(_bf(64, 8)), {})),
    ("bias_2d", "C6", lambda: (_bf(4, 64), _bf(64, 8), {"bias": _bf(1, 8)})),
    ("bias_len", "C6", lambda: (_bf(4, 64), _bf(64, 8), {"bias": _bf(7)})),
    ("bias_dtype_fp", "C6", lambda: (_bf(4, 64), _bf(64, 8), {"bias": torch.ones(8)})),
    ("x3_shape", "C7", lambda: (_bf(4, 64), _bf(64, 8), {"x3": _bf(1, 8)})),
    ("x3_dtype", "C7", lambda: (_bf(4, 64), _bf(64, 8), {"x3": _h(4, 8)})),
    ("fp_with_dequant", "Q5", lambda: (_bf(4, 64), _bf(64, 8), {"dequant_scale": _bf(8)})),
    ("fp_comm_quant", "Q8",
     lambda: (_bf(4, 64), _bf(64, 8), {"comm_quant_scale_1": _bf(8), "comm_quant_scale_2": _bf(8)})),
    ("w8a16_no_scale", "Q1", lambda: (_bf(4, 64), _i8(64, 8), {})),
    ("w8a16_scale_dtype", "Q1", lambda: (_bf(4, 64), _i8(64, 8), {"antiquant_scale": _h(8)})),
    ("w8a16_scale_shape", "Q1", lambda: (_bf(4, 64), _i8(64, 8), {"antiquant_scale": _bf(8, 1)})),
    ("w8a16_offset_shape", "Q2",
     lambda: (_bf(4, 64), _i8(64, 8), {"antiquant_scale": _bf(8), "antiquant_offset": _bf(1, 8)})),
    ("group_not_32x", "Q3",
     lambda: (_bf(4, 64), _i8(64, 8), {"antiquant_scale": _bf(2, 8), "antiquant_group_size": 48})),
    ("group_ge_k", "Q3",
     lambda: (_bf(4, 64), _i8(64, 8), {"antiquant_scale": _bf(1, 8), "antiquant_group_size": 64})),
    ("group_scale_rows", "Q1",
     lambda: (_bf(4, 96), _i8(96, 8), {"antiquant_scale": _bf(2, 8), "antiquant_group_size": 32})),
    ("w8a16_k_65536", "Q4",
     lambda: (_bf(1, 65536), _i8(65536, 1), {"antiquant_scale": _bf(1)})),
    ("w8a16_comm_quant", "Q8",
     lambda: (_bf(4, 64), _i8(64, 8), {"antiquant_scale": _bf(8), "comm_quant_scale_1": _bf(8),
                                       "comm_quant_scale_2": _bf(8)})),
    ("w8a8_no_dequant", "Q5", lambda: (_i8(4, 64), _i8(64, 8), {})),
    ("w8a8_dequant_fp16", "Q5", lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": _h(8)})),
    ("w8a8_dequant_shape", "Q5", lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": _bf(4)})),
    ("w8a8_fp32_no_pertoken", "Q9",
     lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": torch.ones(8)})),
    ("w8a8_int64_not_packed", "Q5",
     lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": torch.ones(8, dtype=torch.int64)})),
    ("w8a8_int64_with_pertoken", "Q5",
     lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": _packed(), "pertoken_scale": torch.ones(4)})),
    ("w8a8_pertoken_shape_3d", "Q6",
     lambda: (_i8(2, 3, 64), _i8(64, 8), {"dequant_scale": _bf(8), "pertoken_scale": torch.ones(3)})),
    ("w8a8_pertoken_dtype", "Q6",
     lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": _bf(8), "pertoken_scale": _bf(4)})),
    ("w8a8_bias_bf16", "C6",
     lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": _bf(8), "bias": _bf(8)})),
    ("w8a8_x3_dtype", "C7",
     lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": _packed(), "x3": _bf(4, 8)})),
    ("w8a8_antiquant", "Q1",
     lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": _bf(8), "antiquant_scale": _bf(8)})),
    ("w8a8_k_65536", "Q7", lambda: (_i8(1, 65536), _i8(65536, 1), {"dequant_scale": _bf(1)})),
    ("w8a8_n_65536_nd", "Q7", lambda: (_i8(1, 1), _i8(1, 65536), {"dequant_scale": _bf(1)})),
    ("comm_quant_one", "Q8",
     lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": _bf(8), "comm_quant_scale_1": _bf(8)})),
    ("comm_quant_dtype", "Q8",
     lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": _bf(8), "comm_quant_scale_1": _h(8),
                                       "comm_quant_scale_2": _h(8)})),
    ("comm_quant_shape_mismatch", "Q8",
     lambda: (_i8(4, 64), _i8(64, 8), {"dequant_scale": _bf(8), "comm_quant_scale_1": _bf(8),
                                       "comm_quant_scale_2": _bf(1, 8)})),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rule", "make"), [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS]
)
def test_mm_all_reduce_violations(
    tnpu: TorchNpuDouble, rule: str, make: Callable[[], tuple[Any, Any, dict[str, Any]]]
) -> None:
    x1, x2, kwargs = make()
    with pytest.raises(DoubleContractError, match=rf"\[{rule}\]"):
        tnpu.npu_mm_all_reduce_base(x1, x2, HC, **kwargs)
    rec = tnpu.calls[-1]
    assert rec.name == "npu_mm_all_reduce_base" and rec.error is not None


def test_w8a8_large_n_allowed_when_transposed(tnpu: TorchNpuDouble) -> None:
    w = torch.zeros(65536, 2, dtype=torch.int8).t()  # (k=2, n=65536) view of an (n, k) tensor
    out = tnpu.npu_mm_all_reduce_base(_i8(1, 2), w, HC, dequant_scale=_bf(1))
    assert out.shape == (1, 65536)


def test_helper_kernel_violations(tnpu: TorchNpuDouble) -> None:
    x = torch.ones(2, 64, dtype=torch.bfloat16)
    w = _i8(64, 8)
    with pytest.raises(DoubleContractError, match="bias dtype"):  # bf16 x needs fp32 bias
        tnpu.npu_weight_quant_batchmatmul(x, w, _bf(8), bias=_bf(8))
    with pytest.raises(DoubleContractError, match="bias dtype"):  # fp16 x needs fp16 bias
        tnpu.npu_weight_quant_batchmatmul(x.half(), w, _h(8), bias=torch.ones(8))
    with pytest.raises(DoubleContractError, match="antiquant_group_size"):
        tnpu.npu_weight_quant_batchmatmul(x, w, _bf(2, 8), antiquant_group_size=40)
    with pytest.raises(DoubleContractError, match="not in the dtype table"):  # bf16 scale -> fp16
        tnpu.npu_quant_matmul(_i8(2, 64), w, _bf(8), output_dtype=torch.float16)
    with pytest.raises(DoubleContractError, match="float32"):
        tnpu.npu_trans_quant_param(torch.ones(4, dtype=torch.float64))
    with pytest.raises(DoubleContractError, match="do not broadcast"):
        tnpu.npu_trans_quant_param(torch.ones(4), torch.ones(3))
    with pytest.raises(DoubleContractError, match="dtype"):
        tnpu.npu_quantize(x, torch.ones(1), None, torch.int8)  # qint8 expected, not int8
    with pytest.raises(DoubleContractError, match="more than 1 dim"):
        tnpu.npu_dynamic_quant(torch.ones(8, dtype=torch.bfloat16))


# ------------------------------------------------------------------ hcom with a real group


def test_hcom_from_group_lookup(tnpu: TorchNpuDouble, gloo_world1: None) -> None:
    pg = dist.distributed_c10d._get_default_group()
    name = pg._get_backend(torch.device("npu")).get_hccl_comm_name(dist.get_rank())
    assert name == f"hccl_{pg.group_name}" and tnpu.comm_name_lookups == 1
    x1, x2 = _bf(4, 64), _bf(64, 8)
    assert torch.equal(tnpu.npu_mm_all_reduce_base(x1, x2, name), (x1 @ x2))
    with pytest.raises(DoubleContractError, match="unknown hcom"):
        tnpu.npu_mm_all_reduce_base(x1, x2, "hccl_other")
    with pytest.raises(DoubleContractError, match="unknown hcom"):  # dist is initialized now
        tnpu.npu_mm_all_reduce_base(x1, x2, HC)
    with pytest.raises(DoubleContractError, match="global rank"):
        pg._get_backend(torch.device("npu")).get_hccl_comm_name(1)
    sub = dist.new_group([0])
    sub_name = sub._get_backend(torch.device("npu")).get_hccl_comm_name(0)
    assert sub_name != name and sub_name == f"hccl_{sub.group_name}"
    assert tnpu.npu_mm_all_reduce_base(x1, x2, sub_name).shape == (4, 8)
    tnpu.reset()
    assert tnpu.calls == [] and tnpu.comm_name_lookups == 0


def test_install_uninstall_restore_state() -> None:
    orig = dist.ProcessGroup._get_backend
    double = npu_double.install_double()
    try:
        import torch_npu

        assert torch_npu is double and npu_double.active_double() is double
        assert dist.ProcessGroup._get_backend is not orig
        assert torch_npu.npu.is_available()
    finally:
        npu_double.uninstall_double()
    assert "torch_npu" not in sys.modules and dist.ProcessGroup._get_backend is orig
    assert npu_double.active_double() is None


# ------------------------------------------------------------------ two ranks (reused pool)


def _two_rank_body(rank: int, world: int) -> None:
    """On a tests/mp_harness.py rank: the double's fused op over the pool's gloo group."""
    double = npu_double.install_double()
    try:
        import torch_npu

        pg = dist.distributed_c10d._get_default_group()
        hcom = pg._get_backend(torch.device("npu")).get_hccl_comm_name(rank)
        g = torch.Generator().manual_seed(7)
        x1 = torch.randn(world, 4, 32, generator=g).bfloat16()
        x2 = torch.randn(world, 32, 8, generator=g).bfloat16()
        out = torch_npu.npu_mm_all_reduce_base(x1[rank], x2[rank], hcom)
        parts = [(x1[r].double() @ x2[r].double()).to(torch.bfloat16).float() for r in range(world)]
        assert torch.equal(out, sum(parts).to(torch.bfloat16))  # type: ignore[union-attr]
        # W8A8 with comm quant: identical partials on both ranks
        q1 = torch.tensor([[1, 2], [3, 4]], dtype=torch.int8)
        w = torch.tensor([[10, 0], [0, 10]], dtype=torch.int8)
        s1 = torch.tensor([0.25, 0.5], dtype=torch.bfloat16)
        s2 = torch.tensor([1.0, 0.5], dtype=torch.bfloat16)
        out = torch_npu.npu_mm_all_reduce_base(
            q1, w, hcom, dequant_scale=_bf(1), comm_quant_scale_1=s1, comm_quant_scale_2=s2
        )
        # a = [[40, 40], [120, 80]] per rank; sum = [[80, 80], [240, 160]];
        # r = sat(rint(sum * s1/s2)) = [[20, 80], [60, 127]]; out = r * s2
        assert out.float().tolist() == [[20.0, 40.0], [60.0, 63.5]]
        assert double.comm_name_lookups == 1
    finally:
        npu_double.uninstall_double()


def test_two_ranks_all_reduce_and_comm_quant() -> None:
    run_ranks(2, _two_rank_body)
