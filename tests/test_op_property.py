"""Property tests of mm_all_reduce_base against the float64 reference of the documented formula
(op_cases.reference64 within op_cases.tolerance): every scenario, dtypes, odd shapes (k and n not
multiples of 16 / 32, m = 1, 2-D and 3-D x1), bias / x3, all W8A16 scale kinds (per-group with a
last partial group) and all W8A8 dequant kinds (pertoken, packed int64 / uint64, bf16, fp32),
quantized communication; at world size 1 in-process and on 2 gloo ranks."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mp_harness import run_ranks
from op_cases import Case, build, reference64, shard, tolerance

import ascend_ops as ao

BF, FP16, F32 = torch.bfloat16, torch.float16, torch.float32


@st.composite
def cases(draw: st.DrawFn, ws: int = 1) -> Case:
    scenario = draw(st.sampled_from(["fp", "w8a16", "w8a8"]))
    dims3 = draw(st.booleans())
    # 3-D x1 is (2, m // 2, k): m even. fp16 (slow CPU GEMM) only with tiny shapes.
    m = 2 * draw(st.integers(1, 6)) if dims3 else draw(st.sampled_from([1, 2, 3, 7, 13]))
    kw: dict = {}
    if scenario == "w8a8":
        dequant = draw(st.sampled_from(["packed", "packed_u64", "bf16", "fp32"]))
        pertoken = dequant == "fp32" or (dequant == "bf16" and draw(st.booleans()))
        dtype = BF if dequant == "bf16" else FP16  # the output dtype is the dequant's (table 3)
        kw.update(
            dequant=dequant,
            pertoken=pertoken,
            scale=draw(st.sampled_from(["tensor", "channel", "channel2d"])),
            comm_quant=draw(st.booleans()),
        )
        tiny = False
    else:
        dtype = draw(st.sampled_from([BF, F32, FP16]))
        tiny = dtype == FP16
    if scenario == "w8a16":
        scale = draw(st.sampled_from(["tensor", "channel", "channel2d", "group"]))
        kw.update(scale=scale, offset=draw(st.booleans()))
        if scale == "group":
            g = draw(st.sampled_from([32, 64]))
            if ws == 1:  # Q3: g <= k - 1; k not a multiple of g (a last, partial group)
                k = g * draw(st.integers(1, 3)) + draw(st.integers(1, g - 1))
            else:  # each rank's k slice holds whole groups, and g <= k_rank - 1
                k = ws * g * draw(st.integers(2, 3))
            kw["group"] = g
        else:
            k = draw(st.integers(1, 48 if tiny else 150))
    else:
        k = draw(st.integers(1, 48 if tiny else 150))
    if ws > 1 and "group" not in kw:
        k = ws * max(1, k // ws)
    n = draw(st.integers(1, 16 if tiny else 40))
    if tiny:
        m = min(m, 4)
    return Case(
        scenario,
        dtype,
        m=m,
        k=k,
        n=n,
        dims3=dims3,
        bias=draw(st.booleans()),
        x3=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        **kw,
    )


def _worst(case: Case, rank: int, ws: int, nk_view: bool = False) -> float:
    t = build(case)
    x1, x2, kw = shard(t, rank, ws)
    if nk_view:  # C2: the transposed view of a contiguous (n, k) weight is a valid x2
        x2 = x2.t().contiguous().t()
    with torch.no_grad():
        out = ao.mm_all_reduce_base(x1, x2, ao.hcom_name(), **kw)
    ref = reference64(t, ws)
    assert out.dtype == t["out_dtype"], (out.dtype, t["out_dtype"])
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs()
    worst = (err / tolerance(t, ws)).max().item()
    assert worst <= 1.0, f"{case}: rank {rank}: max err/tol {worst:.3f}"
    return worst


@settings(max_examples=200)
@given(case=cases(), nk_view=st.booleans())
def test_matches_reference_world_size_one(case: Case, nk_view: bool) -> None:
    _worst(case, 0, 1, nk_view)


def _rank_body(rank: int, ws: int, case: Case, nk_view: bool) -> float:
    return _worst(case, rank, ws, nk_view)


@settings(max_examples=25)
@given(case=cases(ws=2), nk_view=st.booleans())
def test_matches_reference_two_ranks(case: Case, nk_view: bool) -> None:
    worst = run_ranks(2, _rank_body, case, nk_view, timeout=60)
    assert len(worst) == 2


def _odd_k_body(rank: int, ws: int) -> None:
    for m, k, n, nk_view in ((1, 1, 1, False), (3, 100, 24, True), (2, 65, 40, True)):
        _worst(Case("w8a16", BF, m=m, k=k, n=n, scale="channel"), rank, ws, nk_view)


def test_int8pack_fast_path_odd_k() -> None:
    """torch._weight_int8pack_mm returns garbage or crashes unless k % 8 == 0: the fast path
    must not be taken there (run in a worker so a crash cannot kill pytest)."""
    run_ranks(1, _odd_k_body, timeout=60)
