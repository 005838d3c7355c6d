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
