"""The Ascend backend (ascend_ops._npu) against the strict torch_npu double and against every
torch_npu release of the conformance matrix (real schemas and meta functions, the double's
arithmetic; tests/npu_conformance.py).

Each helper is called through ascend_ops.kernels with the Ascend backend forced; the test
checks the recorded vendor call (argument conventions) and that the result equals the
portable backend's: exactly for integer outputs, within one output ulp for float outputs (the
double computes in float64, the portable backend accumulates in float32). The bodies run in a
worker process per release (a torch.library namespace cannot be unregistered).
"""

from __future__ import annotations

import sys

import npu_double
import pytest
import torch
import torch.distributed as dist
from npu_conformance import install_impl, run_on, uninstall_impl

from ascend_ops import _npu, backend, kernels
from ascend_ops.layout import FORMAT_NZ, format_cast, get_format
from ascend_ops.quant_param import trans_quant_param

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _i8(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=_gen(seed), dtype=torch.int8)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = ULP[got.dtype] * want.double().abs().clamp_min(2.0**-10)
    assert bool(((got.double() - want.double()).abs() <= tol * 1.0001).all())


def _ascend(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    with backend.use_backend("ascend"):
        return fn(*args, **kwargs)


def _case_weight_quant_matmul(tnpu) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 3, 64, generator=_gen(1)).to(torch.bfloat16)
    w = _i8((64, 16), 2)
    scale = (torch.rand(2, 16, generator=_gen(3)) * 0.02).to(torch.bfloat16)
    offset = torch.randint(-4, 4, (2, 16), generator=_gen(4)).to(torch.bfloat16)
    bias = torch.randn(16, generator=_gen(5)).to(torch.bfloat16)
    x3 = torch.randn(2, 3, 16, generator=_gen(6)).to(torch.bfloat16)
    with backend.use_backend("ascend"):
        w_nz = format_cast(w, FORMAT_NZ)
        got = kernels.weight_quant_matmul(x, w_nz, scale, offset, bias, 32, x3)
    (rec,) = tnpu.calls_named("npu_weight_quant_batchmatmul")
    assert rec.error is None
    assert rec.args["x"].shape == (6, 64)  # flattened to 2-D
    assert rec.args["weight"].format == FORMAT_NZ
    assert rec.args["bias"].dtype == torch.float32  # fp32 bias for bf16 x
    assert rec.args["antiquant_scale"].dtype == torch.bfloat16
    assert rec.args["antiquant_group_size"] == 32
    want = kernels.weight_quant_matmul(x, w, scale, offset, bias, 32)
    # x3 is added after the vendor call: compare against the portable value + x3, 2 roundings
    assert got.shape == (2, 3, 16)
    _close(got, (want.float() + x3.float()).to(torch.bfloat16))


def _case_weight_quant_matmul_fp16_bias(tnpu) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(3, 32, generator=_gen(7)).half()
    w = _i8((32, 8), 8)
    scale = (torch.rand(8, generator=_gen(9)) * 0.02).half()
    bias = torch.randn(8, generator=_gen(10)).float()
    got = _ascend(kernels.weight_quant_matmul, x, w, scale, None, bias)
    (rec,) = tnpu.calls_named("npu_weight_quant_batchmatmul")
    assert rec.args["bias"].dtype == torch.float16
    _close(got, kernels.weight_quant_matmul(x, w, scale, None, bias.half()))


def _case_quant_matmul_packed_scale(tnpu) -> None:  # type: ignore[no-untyped-def]
    x1 = _i8((2, 3, 32), 11)
    x2 = _i8((32, 8), 12)
    scale = trans_quant_param(torch.rand(8, generator=_gen(13)) * 1e-3)
    bias = torch.randint(-999, 999, (8,), generator=_gen(14), dtype=torch.int32)
    x3 = torch.randn(2, 3, 8, generator=_gen(15)).half()
    got = _ascend(kernels.quant_matmul, x1, x2, scale, bias=bias, x3=x3)
    (rec,) = tnpu.calls_named("npu_quant_matmul")
    assert rec.error is None
    assert rec.args["output_dtype"] == torch.float16  # passed explicitly (vendor default int8)
    assert rec.args["x1"].shape == (6, 32) and rec.args["scale"].dtype == torch.int64
    want = kernels.quant_matmul(x1, x2, scale, bias=bias)
    _close(got, (want.float() + x3.float()).half())


def _case_quant_matmul_pertoken_and_requant(tnpu) -> None:  # type: ignore[no-untyped-def]
    x1 = _i8((2, 3, 32), 16)
    x2 = _i8((32, 8), 17)
    s = (torch.rand(1, 8, generator=_gen(18)) * 1e-2).to(torch.bfloat16)
    pt = torch.rand(6, generator=_gen(19)) + 0.5
    got = _ascend(kernels.quant_matmul, x1, x2, s, pertoken_scale=pt)
    rec = tnpu.calls_named("npu_quant_matmul")[-1]
    assert rec.args["scale"].shape == (8,) and rec.args["pertoken_scale"].shape == (6,)
    assert rec.args["scale"].dtype == torch.float32  # a bf16 scale goes as float32 (bf16 output)
    assert rec.args["output_dtype"] == torch.bfloat16
    _close(got, kernels.quant_matmul(x1, x2, s, pertoken_scale=pt))
    packed = trans_quant_param(torch.full((8,), 2.0**-7), torch.tensor([2.0]))
    got8 = _ascend(kernels.quant_matmul, x1, x2, packed, output_dtype=torch.int8)
    assert torch.equal(got8, kernels.quant_matmul(x1, x2, packed, output_dtype=torch.int8))


def _case_quantize(tnpu) -> None:  # type: ignore[no-untyped-def]
    x = (torch.randn(4, 16, generator=_gen(20)) * 20).to(torch.bfloat16)
    scales = torch.rand(16, generator=_gen(21)) + 0.1
    zps = torch.randint(-5, 5, (16,), generator=_gen(22)).float()
    got = _ascend(kernels.quantize, x, scales, zps, axis=-1)
    (rec,) = tnpu.calls_named("npu_quantize")
    assert rec.args["dtype"] == torch.qint8 and rec.args["zero_points"].dtype == torch.int32
    assert rec.args["axis"] == -1 and rec.args["div_mode"] is True
    assert torch.equal(got, kernels.quantize(x, scales, zps, axis=-1))
    half = torch.full((16,), 0.5)
    got_h = _ascend(kernels.quantize, x, scales, half, axis=-1)
    assert tnpu.calls_named("npu_quantize")[-1].args["zero_points"].dtype == (torch.bfloat16)
    assert torch.equal(got_h, kernels.quantize(x, scales, half, axis=-1))
    got_m = _ascend(kernels.quantize, x, scales, zps, axis=-1, div_mode=False)
    assert torch.equal(got_m, kernels.quantize(x, scales, zps, axis=-1, div_mode=False))
    with pytest.raises(ValueError, match="zero_points"):
        _ascend(kernels.quantize, x, scales, torch.full((16,), 0.1), axis=-1)


def _case_dynamic_quant(tnpu) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 3, 32, generator=_gen(23)).to(torch.bfloat16)
    smooth = torch.rand(32, generator=_gen(24)) + 0.5
    y, s = _ascend(kernels.dynamic_quant, x, smooth_scales=smooth)
    (rec,) = tnpu.calls_named("npu_dynamic_quant")
    assert rec.args["smooth_scales"].dtype == torch.bfloat16
    y_ref, s_ref = kernels.dynamic_quant(x, smooth_scales=smooth.to(torch.bfloat16))
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


def _case_fp_matmul(tnpu) -> None:  # type: ignore[no-untyped-def]
    for with_bias in (False, True):
        _fp_matmul(with_bias)


def _fp_matmul(with_bias: bool) -> None:
    x = torch.randn(2, 3, 32, generator=_gen(25)).to(torch.bfloat16)
    w = torch.randn(32, 8, generator=_gen(26)).to(torch.bfloat16)
    bias = torch.randn(8, generator=_gen(27)).to(torch.bfloat16) if with_bias else None
    got = _ascend(kernels.mm_local, x, w, bias=bias)
    _close(got, kernels.fp_matmul(x, w, bias))


def _case_mm_all_reduce_base_single_process(tnpu) -> None:  # type: ignore[no-untyped-def]
    x1 = torch.randn(4, 32, generator=_gen(28)).to(torch.bfloat16)
    x2 = torch.randn(32, 8, generator=_gen(29)).to(torch.bfloat16)
    bias = torch.randn(8, generator=_gen(30)).to(torch.bfloat16)
    got = _npu.mm_all_reduce_base(x1, x2, npu_double.SINGLE_PROCESS_HCOM, bias=bias)
    (rec,) = tnpu.calls_named("npu_mm_all_reduce_base")
    assert rec.error is None and rec.args["hcom"] == npu_double.SINGLE_PROCESS_HCOM
    assert rec.args["reduce_op"] == "sum" and rec.args["bias"].dtype == torch.bfloat16
    _close(got, kernels.fp_matmul(x1, x2, bias))
    with pytest.raises(TypeError, match="unexpected keyword"):
        _npu.mm_all_reduce_base(x1, x2, "h", biass=bias)


def _case_hcom_name_cached(tnpu) -> None:  # type: ignore[no-untyped-def]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(f"{tmp}/store", 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            group = dist.group.WORLD
            name = _npu.hcom_name(group, 0)
            assert name == f"hccl_{group.group_name}"
            lookups = tnpu.comm_name_lookups
            assert _npu.hcom_name(group, 0) == name
            assert tnpu.comm_name_lookups == lookups  # cached
        finally:
            dist.destroy_process_group()


def _case_format_and_trans_quant_param_use_torch_npu(tnpu) -> None:  # type: ignore[no-untyped-def]
    w = _i8((40, 24), 31)
    with backend.use_backend("ascend"):
        w_nz = format_cast(w, FORMAT_NZ)
        assert get_format(w_nz) == FORMAT_NZ
        packed = trans_quant_param(torch.tensor([0.1, 1.0]), torch.tensor([-3.0]))
    assert tnpu.is_nz(w_nz) and torch.equal(w_nz, w)
    assert torch.equal(packed, trans_quant_param(torch.tensor([0.1, 1.0]), torch.tensor([-3.0])))
    assert tnpu.calls_named("npu_trans_quant_param")


_CASES = sorted(n[len("_case_") :] for n in dir() if n.startswith("_case_"))


def _run_case(rank: int, ws: int, impl: str, name: str) -> None:
    tnpu = install_impl(impl)
    try:
        globals()[f"_case_{name}"](tnpu)
    finally:
        uninstall_impl(impl)


@pytest.mark.parametrize("case", _CASES)
def test_ascend_backend(npu_impl: str, case: str) -> None:
    run_on(npu_impl, 1, _run_case, case)


def test_no_torch_npu_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import torch_npu` fail with ImportError without searching for
    # a real installation.
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    x = torch.randn(2, 8)
    with backend.use_backend("ascend"):
        with pytest.raises(backend.NpuNotAvailableError, match="torch_npu"):
            kernels.quantize(x, torch.ones(1))
        with pytest.raises(backend.NpuNotAvailableError):
            kernels.dynamic_quant(x.to(torch.bfloat16))
        with pytest.raises(backend.NpuNotAvailableError):
            kernels.mm_local(x.to(torch.bfloat16), torch.zeros(8, 4, dtype=torch.bfloat16))
    assert not backend.npu_available()
