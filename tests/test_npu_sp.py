"""The sequence-parallel MC2 ops on the Ascend backend, on the strict double and on every
torch_npu release of the conformance matrix, at world size 2 against the portable result.

Releases before 2.7.1 have no x1_scale / x2_scale / output_dtype / comm_mode (their yaml
schemas): FP calls run there, a quantized call is refused by name before any kernel runs.
"""

from __future__ import annotations

import re

import pytest
import torch
from npu_conformance import VERSIONS, install_impl, run_on, schemas, uninstall_impl
from test_sp_ops import SpCase, full_inputs

import ascend_ops as ao
from ascend_ops import _npu

BF, F16 = torch.bfloat16, torch.float16

CASES = (
    SpCase("ag", BF),
    SpCase("ag", F16, m=2, n=8, gather_output=False),
    SpCase("ag", BF, quant=True),
    SpCase("ag", F16, quant=True, packed=True, gather_output=False),
    SpCase("rs", BF, m=8),
    SpCase("rs", BF, quant=True, m=8, x1_scale=False),
    SpCase("rs", F16, quant=True, m=8, packed=True),
)


def _call(c: SpCase, t: dict, rank: int, ws: int, hcom: str, comm_mode: str | None) -> tuple:
    kw: dict = {}
    if c.quant:
        kw = {"x2_scale": t["s2"], "comm_mode": "aiv"}
        if not c.packed:
            kw["output_dtype"] = c.dtype
    elif comm_mode is not None:
        kw["comm_mode"] = comm_mode
    if c.op == "ag":
        rows = slice(rank * c.m, (rank + 1) * c.m)
        if c.quant and t["s1"] is not None:
            kw["x1_scale"] = t["s1"][rows].contiguous()
        return ao.all_gather_base_mm(
            t["x1"][rows].contiguous(), t["x2"], hcom, ws, gather_output=c.gather_output, **kw
        )
    ks = slice(rank * c.k, (rank + 1) * c.k)
    if c.quant and t["s1"] is not None:
        kw["x1_scale"] = t["s1"]
    out = ao.mm_reduce_scatter_base(
        t["x1"][:, ks].contiguous(), t["x2"][ks].contiguous(), hcom, ws, **kw
    )
    return (out,)


def _sp_body(rank: int, ws: int, impl: str) -> list[str]:
    """Every case on the Ascend backend vs the portable one; returns the cases refused."""
    tnpu = install_impl(impl)
    refused: list[str] = []
    try:
        version = re.escape(str(getattr(tnpu, "__version__", "(unknown version)")))
        portable_hcom = ao.hcom_name()
        with ao.use_backend("ascend"):
            hcom = ao.hcom_name()
        quant_ok = "x2_scale" in _npu.arg_names("npu_all_gather_base_mm")
        for c in CASES:
            t = full_inputs(c, ws)
            with torch.no_grad():
                want = _call(c, t, rank, ws, portable_hcom, None)
                modes = (None, "aiv") if quant_ok and not c.quant else (None,)
                for mode in modes:
                    tnpu.reset()
                    vendor = (
                        f"npu_{'all_gather_base_mm' if c.op == 'ag' else 'mm_reduce_scatter_base'}"
                    )
                    if c.quant and not quant_ok:
                        first = "x1_scale" if t["s1"] is not None else "x2_scale"
                        with (
                            ao.use_backend("ascend"),
                            pytest.raises(
                                TypeError,
                                match=rf"^{first}: torch_npu {version}'s {vendor} has no such arg",
                            ),
                        ):
                            _call(c, t, rank, ws, hcom, mode)
                        assert not tnpu.calls_named(vendor), c
                        refused.append(str(c))
                        continue
                    with ao.use_backend("ascend"):
                        got = _call(c, t, rank, ws, hcom, mode)
                    (rec,) = tnpu.calls_named(vendor)
                    assert rec.error is None and rec.args["hcom"] == hcom, (c, rec)
                    for g, w in zip(got, want, strict=True):
                        assert g.dtype == w.dtype and g.shape == w.shape, (c, g.shape, w.shape)
                        if g.is_floating_point():
                            # both round each rank's value once; the sums differ at most in
                            # the last place of the output dtype
                            torch.testing.assert_close(g, w, rtol=2 * 2.0**-8, atol=1e-3)
                        else:
                            assert torch.equal(g, w), c
    finally:
        uninstall_impl(impl)
    return refused


def _takes_quant_args(impl: str) -> bool:
    """Whether ``impl``'s npu_all_gather_base_mm has x1_scale / x2_scale (the double: yes;
    releases: by their schema, absent in 2.1.0.post8 and 2.5.1.post1)."""
    return impl == "double" or "x2_scale" in schemas(impl).get("npu_all_gather_base_mm", "")


def test_sp_ops_on_ascend_backend(npu_impl: str) -> None:
    refused = run_on(npu_impl, 2, _sp_body)
    quant = [str(c) for c in CASES if c.quant]
    if not _takes_quant_args(npu_impl):  # no x1_scale / x2_scale / output_dtype / comm_mode
        assert refused == [quant, quant], refused
    else:
        assert refused == [[], []], refused


# ---------------------------------------------------------------------------------- graph mode


def _sp_fn(x, w, xq, wq, s1, s2, hcom: str, ws: int, quant: bool):  # type: ignore[no-untyped-def]
    a, g = ao.all_gather_base_mm(x, w, hcom, ws)
    c = ao.mm_reduce_scatter_base(g, w, hcom, ws)
    if not quant:
        return a, g, c
    b, _ = ao.all_gather_base_mm(
        xq, wq, hcom, ws, x1_scale=s1, x2_scale=s2, comm_mode="aiv", gather_output=False
    )
    d = ao.mm_reduce_scatter_base(
        xq.repeat(ws, 1), wq, hcom, ws, x2_scale=s2, comm_mode="aiv", output_dtype=F16
    )
    return a, g, c, b, d


def _sp_compile_body(rank: int, ws: int, impl: str) -> tuple[bool, list[str]]:
    from test_npu_conformance import graph_targets
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    install_impl(impl)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    try:
        quant = "x2_scale" in _npu.arg_names("npu_all_gather_base_mm")
        g = torch.Generator().manual_seed(5 + rank)
        x = torch.randn(4, 256, generator=g).to(BF)
        w = (torch.randn(256, 16, generator=g) / 16).to(BF)
        xq = torch.randint(-128, 128, (4, 256), generator=g, dtype=torch.int8)
        wq = torch.randint(-128, 128, (256, 16), generator=g, dtype=torch.int8)
        s1 = torch.rand(4, 1, generator=g) + 0.5
        s2 = torch.rand(1, 16, generator=g) * 1e-3
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(_sp_fn, fullgraph=True, backend=aot_autograd(fw_compiler=record))
        with ao.use_backend("ascend"), torch.no_grad():
            hcom = ao.hcom_name()
            want = _sp_fn(x, w, xq, wq, s1, s2, hcom, ws, quant)
            got = compiled(x, w, xq, wq, s1, s2, hcom, ws, quant)
        for a, b in zip(want, got, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert len(graphs) == 1, len(graphs)
        torch._dynamo.reset()
    finally:
        uninstall_impl(impl)
    return quant, graph_targets(graphs[0])


@pytest.mark.parametrize("npu_impl", VERSIONS, indirect=True)
def test_compiled_sp_ops_trace_the_vendor_ops(npu_impl: str) -> None:
    from test_npu_conformance import assert_torchair_lowers

    for quant, targets in run_on(npu_impl, 2, _sp_compile_body, timeout=600):
        assert_torchair_lowers(npu_impl, targets, "sp")
        assert not any(t.startswith("ascend_ops.") for t in targets), targets
        n = 2 if quant else 1
        assert targets.count("npu.npu_all_gather_base_mm.default") == n, targets
        assert targets.count("npu.npu_mm_reduce_scatter_base.default") == n, targets
        assert quant == _takes_quant_args(npu_impl)


# ------------------------------------------------------------------------ the double is strict

_X, _W = torch.zeros(4, 256, dtype=BF), torch.zeros(256, 8, dtype=BF)
_XQ, _WQ = torch.zeros(4, 256, dtype=torch.int8), torch.zeros(256, 8, dtype=torch.int8)
_S2 = torch.ones(1, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bias": torch.zeros(8, dtype=BF)}, "bias: only None"),
        ({"input": torch.zeros(4, 128, dtype=BF), "x2": torch.zeros(128, 8, dtype=BF)}, "k=128"),
        ({"x2": _W.half()}, "the same for both"),
        ({"input": _X.t().contiguous().t()}, "x1 must be contiguous"),
        ({"comm_turn": 1}, "comm_turn must be 0"),
        ({"x2_scale": _S2}, "quantized only"),
        ({"input": _XQ, "x2": _WQ, "x2_scale": _S2}, "needs comm_mode='aiv'"),
        ({"input": _XQ, "x2": _WQ, "comm_mode": "aiv"}, "x2_scale is required"),
        ({"input": _XQ, "x2": _WQ, "x2_scale": _S2.half(), "comm_mode": "aiv"}, "float32 or int64"),
        ({"world_size": 1}, r"world_size=1 must be the domain's size 1 \(2, 4 or 8\)"),
    ],
)
@pytest.mark.parametrize("op", ["npu_all_gather_base_mm", "npu_mm_reduce_scatter_base"])
def test_double_checks_the_sp_docs(torch_npu_double, op: str, kwargs: dict, match: str) -> None:  # type: ignore[no-untyped-def]
    import npu_double

    a = {"input": _X, "x2": _W, "hcom": npu_double.SINGLE_PROCESS_HCOM, "world_size": 2, **kwargs}
    if "world_size" not in kwargs:  # every other case fails before the domain is resolved
        a["world_size"] = 2
    with pytest.raises(npu_double.DoubleContractError, match=match):
        getattr(torch_npu_double, op)(a.pop("input"), a.pop("x2"), a.pop("hcom"), **a)
