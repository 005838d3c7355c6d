"""The layers on the Ascend backend, through the strict torch_npu double and every torch_npu
release of the conformance matrix: prefill issues exactly one npu_mm_all_reduce_base per row
layer and no separate all-reduce; decode issues none and one all-reduce; quantized weights
arrive FRACTAL_NZ, scales in the documented dtypes; results equal the portable backend's."""

from __future__ import annotations

import pytest
import torch
from layer_cases import SCHEMES, make_input, make_linear
from npu_conformance import install_impl, run_on, uninstall_impl

K, N = 256, 64


def _row_layer(scheme_name: str, dtype: torch.dtype, tp):
    import tp_layers as tl

    layer = tl.RowParallelLinear(
        K, N, bias=True, quant=SCHEMES[scheme_name], params_dtype=dtype, tp=tp, prefix="o_proj"
    )
    t = make_linear(N, K, True, SCHEMES[scheme_name], 1)
    for name, p in layer.named_parameters():
        v = t[name]
        if v.is_floating_point() and name not in (
            "weight_scale",
            "weight_offset",
            "input_scale",
            "input_offset",
            "deq_scale",
        ):
            v = v.to(dtype)
        p.weight_loader(p, v)
    layer.process_weights_after_loading()
    return layer


def _npu_body(rank: int, ws: int, impl: str, scheme_name: str, dtype_name: str) -> None:
    import ascend_ops
    import tp_layers as tl

    dtype = getattr(torch, dtype_name)
    x = make_input((2, 4, K // ws), seed=rank).to(dtype)
    xd = make_input((3, 1, K // ws), seed=rank + 5).to(dtype)
    with torch.no_grad():
        portable = _row_layer(scheme_name, dtype, tl.TPContext.from_group())
        with tl.phase("prefill"):
            want_p = portable(x)
        with tl.phase("decode"):
            want_d = portable(xd)
    from ascend_ops import _portable

    double = install_impl(impl)
    # count the library's separate all-reduce (the double's fused op emulates HCCL with its own
    # dist.all_reduce, which must not be counted)
    calls = {"all_reduce": 0}
    real_all_reduce = _portable.all_reduce

    def counting_all_reduce(*a, **k):
        calls["all_reduce"] += 1
        return real_all_reduce(*a, **k)

    _portable.all_reduce = counting_all_reduce
    try:
        with ascend_ops.use_backend("ascend"), torch.no_grad():
            tp = tl.TPContext.from_group()
            assert tp.hcom.startswith("hccl_"), tp.hcom
            layer = _row_layer(scheme_name, dtype, tp)
            w = layer.weight
            if SCHEMES[scheme_name].is_quantized:
                assert double.is_nz(w), "quantized weight must be FRACTAL_NZ on Ascend"
            else:
                assert not double.is_nz(w), "FP weights stay ND (Atlas A2 rejects NZ in FP)"
            assert tuple(w.shape) == (K // ws, N)
            double.reset()
            calls["all_reduce"] = 0
            with tl.phase("prefill"):
                got_p = layer(x)
            fused = double.calls_named("npu_mm_all_reduce_base")
            assert len(fused) == 1 and calls["all_reduce"] == 0, (len(fused), calls)
            args = fused[0].args
            assert args["hcom"] == tp.hcom
            if rank != 0:
                assert args["bias"] is None and args["x3"] is None
            if scheme_name == "w8a8":
                want_dq = torch.int64 if dtype == torch.float16 else torch.bfloat16
                assert args["dequant_scale"].dtype == want_dq
                assert args["bias"] is None or args["bias"].dtype == torch.int32
            if scheme_name == "w8a8_dynamic":
                want_dq = torch.float32 if dtype == torch.float16 else torch.bfloat16
                assert (
                    args["dequant_scale"].dtype == want_dq
                    and args["pertoken_scale"].dtype == torch.float32
                )
            if scheme_name.startswith("w8a16"):
                assert args["antiquant_scale"].dtype == dtype
            double.reset()
            calls["all_reduce"] = 0
            with tl.phase("decode"):
                got_d = layer(xd)
            assert not double.calls_named("npu_mm_all_reduce_base")
            assert calls["all_reduce"] == 1, calls
            if scheme_name.startswith("w8a8") and dtype == torch.bfloat16:
                # the unfused matmul takes the dequant scale as float32 (the fused op: bf16)
                (qmm,) = double.calls_named("npu_quant_matmul")
                assert qmm.args["scale"].dtype == torch.float32
                assert qmm.args["output_dtype"] == torch.bfloat16
    finally:
        _portable.all_reduce = real_all_reduce
        uninstall_impl(impl)
    u = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for got, want in ((got_p, want_p), (got_d, want_d)):
        tol = 4 * u * want.double().abs() + 4 * u
        assert bool(((got.double() - want.double()).abs() <= tol).all()), (
            (got.double() - want.double()).abs().max()
        )


@pytest.mark.parametrize(
    ("scheme_name", "dtype_name"),
    [
        ("fp", "bfloat16"),
        ("w8a16", "bfloat16"),
        ("w8a16_g32_asym", "bfloat16"),
        ("w8a8", "bfloat16"),
        ("w8a8", "float16"),
        ("w8a8_dynamic", "bfloat16"),
        ("w8a8_dynamic", "float16"),
    ],
)
def test_row_layer_on_ascend_backend(npu_impl: str, scheme_name: str, dtype_name: str) -> None:
    run_on(npu_impl, 2, _npu_body, scheme_name, dtype_name)
