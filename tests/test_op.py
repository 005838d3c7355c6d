"""mm_all_reduce_base on 1, 2 and 4 gloo ranks vs a float64 single-process reference."""

from __future__ import annotations

import inspect

import pytest
import torch
from mp_harness import run_ranks
from op_cases import Case, build, reference64, shard, tolerance

import ascend_ops


def _check(rank: int, ws: int, case: Case) -> float:
    """Body run on every rank: shard, call the op, compare with the unsharded reference."""
    import ascend_ops as ao

    t = build(case)
    x1, x2, kw = shard(t, rank, ws)
    with torch.no_grad():
        out = ao.mm_all_reduce_base(x1, x2, ao.hcom_name(), **kw)
    ref = reference64(t, ws)
    assert out.dtype == t["out_dtype"], (out.dtype, t["out_dtype"])
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = (out.double() - ref).abs()
    tol = tolerance(t, ws)
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"rank {rank}: max err/tol {worst:.3f}, max err {err.max().item():.3g}"
    return worst


CASES = [
    # FP
    Case("fp", torch.bfloat16),
    Case("fp", torch.bfloat16, dims3=True, bias=True, x3=True),
    Case("fp", torch.float32, bias=True),
    Case("fp", torch.float32, dims3=True, x3=True),
    Case("fp", torch.float16, m=4, k=32, n=8, bias=True, x3=True),
    # W8A16
    Case("w8a16", torch.bfloat16, scale="tensor"),
    Case("w8a16", torch.bfloat16, scale="channel", offset=True, bias=True),
    Case("w8a16", torch.bfloat16, scale="channel2d", dims3=True, x3=True),
    Case("w8a16", torch.bfloat16, k=256, scale="group", group=32, offset=True),
    Case("w8a16", torch.bfloat16, k=512, scale="group", group=64, dims3=True, bias=True, x3=True),
    Case("w8a16", torch.float16, m=4, k=256, n=8, scale="group", group=32, offset=True, bias=True),
    # W8A8
    Case("w8a8", torch.float16, dequant="packed"),
    Case("w8a8", torch.float16, dequant="packed_u64", scale="tensor", bias=True),
    Case("w8a8", torch.bfloat16, dequant="bf16", bias=True, x3=True),
    Case("w8a8", torch.bfloat16, dequant="bf16", scale="channel2d", pertoken=True, dims3=True),
    Case("w8a8", torch.float16, dequant="fp32", pertoken=True, bias=True, x3=True),
    Case("w8a8", torch.float16, dequant="packed", dims3=True, x3=True),
    # quantized communication
    Case("w8a8", torch.bfloat16, dequant="bf16", comm_quant=True, bias=True),
    Case("w8a8", torch.float16, dequant="fp32", pertoken=True, comm_quant=True, dims3=True),
]


@pytest.mark.parametrize("ws", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_op_matches_unsharded_reference(ws: int, case: Case) -> None:
    worst = run_ranks(ws, _check, case)
    assert len(worst) == ws


def test_signature_is_the_vendors() -> None:
    sig = inspect.signature(ascend_ops.mm_all_reduce_base)
    want = [
        ("x1", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("x2", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("hcom", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("reduce_op", inspect.Parameter.KEYWORD_ONLY, "sum"),
        ("bias", inspect.Parameter.KEYWORD_ONLY, None),
        ("antiquant_scale", inspect.Parameter.KEYWORD_ONLY, None),
        ("antiquant_offset", inspect.Parameter.KEYWORD_ONLY, None),
        ("x3", inspect.Parameter.KEYWORD_ONLY, None),
        ("dequant_scale", inspect.Parameter.KEYWORD_ONLY, None),
        ("pertoken_scale", inspect.Parameter.KEYWORD_ONLY, None),
        ("comm_quant_scale_1", inspect.Parameter.KEYWORD_ONLY, None),
        ("comm_quant_scale_2", inspect.Parameter.KEYWORD_ONLY, None),
        ("comm_turn", inspect.Parameter.KEYWORD_ONLY, 0),
        ("antiquant_group_size", inspect.Parameter.KEYWORD_ONLY, 0),
    ]
    got = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
    assert got == want


def test_world_size_one_without_dist_calls_no_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    assert not dist.is_initialized()

    def boom(*a, **k):
        raise AssertionError("no collective may run at world size 1")

    monkeypatch.setattr(dist, "all_reduce", boom)
    monkeypatch.setattr(dist, "all_gather", boom)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(16, 8, dtype=torch.bfloat16)
    hcom = ascend_ops.hcom_name()
    assert hcom == ascend_ops.LOCAL_HCOM
    out = ascend_ops.mm_all_reduce_base(x, w, hcom)
    torch.testing.assert_close(out, (x.float() @ w.float()).bfloat16(), rtol=0, atol=0)
    y = ascend_ops.all_reduce(out, hcom)
    assert torch.equal(y, out)


def test_unknown_hcom_is_a_clear_error() -> None:
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(16, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"hcom: unknown communication domain 'nope'.*\(C4\)"):
        ascend_ops.mm_all_reduce_base(x, w, "nope")


def _hcom_roundtrip(rank: int, ws: int) -> str:
    import torch.distributed as dist

    import ascend_ops as ao
    from ascend_ops.hcom import resolve_hcom

    name = ao.hcom_name()
    assert resolve_hcom(name) is dist.group.WORLD
    sub = dist.new_group([0, 1])
    # the op on a 2-rank sub-group of a 4-rank world sums over that sub-group only
    x = torch.full((2, 4), float(rank + 1), dtype=torch.float32)
    w = torch.eye(4)
    if rank < 2:
        sub_name = ao.hcom_name(sub)
        assert sub_name != name and resolve_hcom(sub_name) is sub
        out = ao.mm_all_reduce_base(x, w, sub_name)
        assert torch.equal(out, torch.full((2, 4), 3.0))
    out = ao.mm_all_reduce_base(x, w, name)
    assert torch.equal(out, torch.full((2, 4), float(sum(range(1, ws + 1)))))
    with pytest.raises(ValueError, match=r"\(C4\)"):
        resolve_hcom("not-a-group")
    return name


def test_hcom_names_resolve_to_their_groups() -> None:
    names = run_ranks(4, _hcom_roundtrip)
    assert len(set(names)) == 1


def _all_reduce_body(rank: int, ws: int) -> None:
    import ascend_ops as ao

    x = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) * (rank + 1)
    y = ao.all_reduce(x, ao.hcom_name())
    assert torch.equal(
        y, torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) * sum(range(1, ws + 1))
    )
    assert torch.equal(x, torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) * (rank + 1)), (
        "not in place by default"
    )
    z = ao.all_reduce(x, ao.hcom_name(), inplace=True)
    assert z.data_ptr() == x.data_ptr()


def test_all_reduce() -> None:
    run_ranks(2, _all_reduce_body)


def _local_hcom_in_multi_rank_job(rank: int, ws: int) -> list[str]:
    import ascend_ops as ao

    x1, x2 = torch.randn(4, 8), torch.randn(8, 6)
    messages = []
    for call in (
        lambda: ao.mm_all_reduce_base(x1, x2, ao.LOCAL_HCOM),
        lambda: ao.all_reduce(x1, ao.LOCAL_HCOM),
        lambda: ao.all_gather(x1, ao.LOCAL_HCOM),
    ):
        try:
            with torch.no_grad():
                call()
        except ValueError as e:
            messages.append(str(e))
        else:
            messages.append("no error")
    return messages


@pytest.mark.parametrize("ws", [2, 4])
def test_local_hcom_refused_in_a_multi_rank_job(ws: int) -> None:
    """hcom="local" would skip the reduction on every rank (each keeps its partial sum)."""
    for rank, messages in enumerate(run_ranks(ws, _local_hcom_in_multi_rank_job)):
        for msg in messages:
            assert msg.startswith("hcom: 'local' names a world-size-1 domain"), msg
            assert f"rank {rank} of an initialised {ws}-rank job" in msg
            assert "reduce_results=False" in msg and msg.endswith("(C4)")


def test_local_hcom_still_works_without_torch_distributed() -> None:
    x1, x2 = torch.randn(4, 8), torch.randn(8, 6)
    with torch.no_grad():
        out = ascend_ops.mm_all_reduce_base(x1, x2, ascend_ops.LOCAL_HCOM)
    assert torch.allclose(out, x1 @ x2, atol=1e-5)


# -- the kernel's rounding order, exactly ------------------------------------------------------
# Integer-valued operands make every product sum exact in float32, so the only roundings left are
# the ones the kernel makes; the model below states them in float64 with explicit casts
# (hicann/ops-transformer mc2/matmul_all_reduce/op_kernel: matmul_all_reduce_add_x3.h,
# matmul_all_reduce_quant_perchannel.h, matmul_all_reduce_quant_reduce_sum.h,
# matmul_all_reduce_dequant_perchannel.h).


def _exact_inputs(scenario: str, dt: torch.dtype, comm_quant: bool) -> dict:
    g = torch.Generator().manual_seed(7)
    m, k, n = 6, 32, 16
    t: dict = {}
    if scenario == "w8a8":
        t["x1"] = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        t["x2"] = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
        t["bias"] = torch.randint(-5000, 5000, (n,), generator=g, dtype=torch.int32)
        t["dequant_scale"] = torch.full((n,), 2.0**-6, dtype=torch.bfloat16)
        if dt == torch.float16:
            t["dequant_scale"] = ascend_ops.trans_quant_param(torch.full((n,), 2.0**-6))
    else:
        t["x1"] = torch.randint(-16, 16, (m, k), generator=g).to(dt)
        if scenario == "w8a16":
            t["x2"] = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
            t["antiquant_scale"] = torch.full((n,), 2.0**-3, dtype=dt)
        else:
            t["x2"] = torch.randint(-16, 16, (k, n), generator=g).to(dt)
        t["bias"] = torch.randint(-300, 300, (n,), generator=g).to(dt)
    t["x3"] = (torch.randn(m, n, generator=g) * 40).to(dt)
    if comm_quant:
        t["comm_quant_scale_1"] = (torch.rand(n, generator=g) * 0.5 + 0.7).to(dt)
        t["comm_quant_scale_2"] = (torch.rand(n, generator=g) * 2 + 3).to(dt)
    return t


def _exact_shard(t: dict, rank: int, ws: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    k = t["x1"].shape[1]
    sl = slice(rank * k // ws, (rank + 1) * k // ws)
    kw = {a: v for a, v in t.items() if a not in ("x1", "x2", "bias", "x3")}
    if rank == 0:
        kw.update(bias=t["bias"], x3=t["x3"])
    return t["x1"][:, sl].contiguous(), t["x2"][sl], kw


def _exact_body(rank: int, ws: int, scenario: str, dt: torch.dtype, cq: bool) -> torch.Tensor:
    import ascend_ops as ao

    x1, x2, kw = _exact_shard(_exact_inputs(scenario, dt, cq), rank, ws)
    with torch.no_grad():
        return ao.mm_all_reduce_base(x1, x2, ao.hcom_name(), **kw)


def _model64(t: dict, ws: int, dt: torch.dtype) -> torch.Tensor:
    """The kernel's rounding order in float64: per rank round(x1 @ w (+ bias) [* scale]) to dt,
    + x3 (rank 0) rounded to dt; sum rounded to dt (two ranks: one add); or the comm-quant chain."""
    parts = []
    for r in range(ws):
        x1, x2, kw = _exact_shard(t, r, ws)
        w = x2.double()
        if "antiquant_scale" in kw:
            w = w * kw["antiquant_scale"].double()
        acc = x1.double() @ w
        if "bias" in kw:
            acc = acc + kw["bias"].double()
        if "dequant_scale" in kw:
            acc = acc * 2.0**-6
        v = acc.to(dt).double()
        if "x3" in kw:
            v = (v + kw["x3"].double()).to(dt).double()
        parts.append(v)
    if "comm_quant_scale_1" not in t:
        total = parts[0]
        for p in parts[1:]:
            total = (total + p).to(dt).double()
        return total
    s1, s2 = t["comm_quant_scale_1"].double(), t["comm_quant_scale_2"].double()
    # stage 1: fp16 output divides in half precision, bf16 in float32 then rounds to fp16
    q = [p / s1 if dt == torch.float16 else (p / s1).float().double() for p in parts]
    a = [torch.round(x.half().double()).clamp(-128, 127) for x in q]
    # stage 2: float32 sum times float32(s1 / s2), fp32 -> fp16 -> int8
    ratio = (s1 / s2).float().double()
    r = torch.round((sum(a) * ratio).float().half().double()).clamp(-128, 127)
    return (r * s2).to(dt).double()


@pytest.mark.parametrize("ws", [1, 2])
@pytest.mark.parametrize(
    ("scenario", "dt", "cq"),
    [
        ("fp", torch.bfloat16, False),
        ("fp", torch.float16, False),
        ("w8a16", torch.bfloat16, False),
        ("w8a16", torch.float16, False),
        ("w8a8", torch.bfloat16, False),
        ("w8a8", torch.float16, False),
        ("w8a8", torch.bfloat16, True),
        ("w8a8", torch.float16, True),
    ],
)
def test_rounding_order_is_the_kernels(ws: int, scenario: str, dt: torch.dtype, cq: bool) -> None:
    t = _exact_inputs(scenario, dt, cq)
    want = _model64(t, ws, dt)
    outs = run_ranks(ws, _exact_body, scenario, dt, cq)
    for out in outs:
        assert out.dtype == dt
        assert torch.equal(out.double(), want), (out.double() - want).abs().max()
