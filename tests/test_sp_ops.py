"""all_gather_base_mm / mm_reduce_scatter_base on 1, 2 and 4 gloo ranks vs an independent float64
model of the vendor formulas, every rule G1-G13 / R1-R13 with a call that breaks it, and
torch.compile(fullgraph=True). The Ascend path: tests/test_npu_sp.py."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from mp_harness import run_ranks
from op_cases import UNIT_ROUNDOFF

import ascend_ops as ao
from ascend_ops import trans_quant_param, unpack_quant_param
from ascend_ops._compat import DYNAMO_REPORTS_EXCEPTION_ARGS

BF, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@dataclasses.dataclass(frozen=True)
class SpCase:
    op: str  # "ag" | "rs"
    dtype: torch.dtype  # FP: input dtype; quantized: output dtype
    quant: bool = False
    m: int = 8  # ag: rows per rank; rs: rows of every rank's input (divisible by ws)
    k: int = 256  # k of every rank's input (rs: the full k is k * ws)
    n: int = 24
    x1_scale: bool = True
    packed: bool = False  # x2_scale int64 (trans_quant_param) -> float16 output
    gather_output: bool = True
    seed: int = 0

    def __str__(self) -> str:
        q = f",quant,packed={self.packed},x1s={self.x1_scale}" if self.quant else ""
        return f"{self.op},{str(self.dtype)[6:]},m{self.m}k{self.k}n{self.n}{q},go={self.gather_output}"


def full_inputs(c: SpCase, ws: int) -> dict:
    """Unsharded tensors (identical on every rank: seeded)."""
    g = torch.Generator().manual_seed(c.seed)
    rows = c.m * ws if c.op == "ag" else c.m
    k = c.k if c.op == "ag" else c.k * ws
    t: dict = {}
    if c.quant:
        t["x1"] = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
        t["x2"] = torch.randint(-128, 128, (k, c.n), generator=g, dtype=torch.int8)
        t["s1"] = (torch.rand(rows, 1, generator=g) * 0.02 + 0.001) if c.x1_scale else None
        s2 = torch.rand(1, c.n, generator=g) * 2e-3 + 1e-4
        t["s2"] = trans_quant_param(s2) if c.packed else s2
    else:
        t["x1"] = torch.randn(rows, k, generator=g).to(c.dtype)
        t["x2"] = (torch.randn(k, c.n, generator=g) / k**0.5).to(c.dtype)
    return t


def model64(c: SpCase, t: dict, ws: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The vendor formulas in float64: (per-rank expected outputs, magnitude bound B)."""
    x1, x2 = t["x1"].double(), t["x2"].double()
    if c.quant:
        s2 = t["s2"]
        s2 = (unpack_quant_param(s2)[0] if s2.dtype == torch.int64 else s2).double()
        s1 = t["s1"].double() if t["s1"] is not None else torch.ones(x1.shape[0], 1).double()
        scale = s1 * s2
    else:
        scale = torch.ones(1, 1, dtype=torch.float64)
    if c.op == "ag":  # output = (allgather(x1_scale) * x2_scale) * (allgather(x1) @ x2)
        out = scale * (x1 @ x2)
        bound = scale.abs() * (x1.abs() @ x2.abs())
        return [out] * ws, bound
    # rs: output = reducescatter((x1_scale * x2_scale) * (x1_r @ x2_r)), x1 / x2 k-sharded
    kr = c.k
    total = sum(
        scale * (x1[:, r * kr : (r + 1) * kr] @ x2[r * kr : (r + 1) * kr]) for r in range(ws)
    )
    bound = scale.abs() * (x1.abs() @ x2.abs())
    rows = c.m // ws
    return [total[r * rows : (r + 1) * rows] for r in range(ws)], bound


def out_dtype(c: SpCase) -> torch.dtype:
    if not c.quant:
        return c.dtype
    return F16 if c.packed else c.dtype


def _check(rank: int, ws: int, c: SpCase) -> float:
    t = full_inputs(c, ws)
    hcom = ao.hcom_name()
    kw = {}
    if c.quant:
        kw = {"x2_scale": t["s2"], "comm_mode": "aiv"}
        if not c.packed:
            kw["output_dtype"] = c.dtype
    with torch.no_grad():
        if c.op == "ag":
            rows = slice(rank * c.m, (rank + 1) * c.m)
            x1 = t["x1"][rows].contiguous()
            if c.quant and t["s1"] is not None:
                kw["x1_scale"] = t["s1"][rows].contiguous()
            out, gathered = ao.all_gather_base_mm(
                x1, t["x2"], hcom, ws, gather_output=c.gather_output, **kw
            )
            if c.gather_output:
                assert gathered.dtype == t["x1"].dtype and torch.equal(gathered, t["x1"])
            else:
                assert gathered.shape == (0,) and gathered.dtype == t["x1"].dtype
        else:
            kr = c.k
            ks = slice(rank * kr, (rank + 1) * kr)
            if c.quant and t["s1"] is not None:
                kw["x1_scale"] = t["s1"]
            out = ao.mm_reduce_scatter_base(
                t["x1"][:, ks].contiguous(), t["x2"][ks].contiguous(), hcom, ws, **kw
            )
    want, bound = model64(c, t, ws)
    ref = want[rank]
    if c.op == "rs":
        rows = c.m // ws
        bound = bound[rank * rows : (rank + 1) * rows]
    assert out.dtype == out_dtype(c), (out.dtype, out_dtype(c))
    assert out.shape == ref.shape, (out.shape, ref.shape)
    # one rounding per rank, ws - 1 in the reduction (rs), float32 accumulation over k
    u = UNIT_ROUNDOFF[out_dtype(c)]
    nround = (ws + 2) if c.op == "rs" else 2
    tol = nround * u * bound + t["x1"].shape[1] * 2.0**-24 * bound + 1e-30
    err = (out.double() - ref).abs()
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"rank {rank}: max err/tol {worst:.3f}, max err {err.max().item():.3g}"
    return worst


CASES = [
    SpCase("ag", BF),
    SpCase("ag", F32, m=5, n=40, gather_output=False),
    SpCase("ag", F16, m=2, n=8),
    SpCase("ag", BF, quant=True),
    SpCase("ag", F16, quant=True, x1_scale=False, gather_output=False),
    SpCase("ag", F16, quant=True, packed=True),
    SpCase("rs", BF, m=8),
    SpCase("rs", F32, m=16, n=40),
    SpCase("rs", F16, m=4, k=256, n=8),
    SpCase("rs", BF, quant=True, m=8, k=384),
    SpCase("rs", F16, quant=True, m=8, packed=True),
    SpCase("rs", BF, quant=True, m=12, k=256, x1_scale=False),
]


@pytest.mark.parametrize("ws", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sp_op_matches_float64_model(ws: int, case: SpCase) -> None:
    if case.op == "rs" and case.m % ws:
        pytest.skip("m not divisible by ws")
    worst = run_ranks(ws, _check, case)
    assert len(worst) == ws


def test_signatures_are_the_vendors() -> None:
    kw, pos = inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
    e = inspect.Parameter.empty
    head = [("input", pos, e), ("x2", pos, e), ("hcom", pos, e), ("world_size", pos, e)]
    ag = [
        *head,
        ("bias", kw, None),
        ("x1_scale", kw, None),
        ("x2_scale", kw, None),
        ("gather_index", kw, 0),
        ("gather_output", kw, True),
        ("comm_turn", kw, 0),
        ("output_dtype", kw, None),
        ("comm_mode", kw, None),
    ]
    rs = [
        *head,
        ("reduce_op", kw, "sum"),
        ("bias", kw, None),
        ("x1_scale", kw, None),
        ("x2_scale", kw, None),
        ("comm_turn", kw, 0),
        ("output_dtype", kw, None),
        ("comm_mode", kw, None),
    ]
    for fn, want in ((ao.all_gather_base_mm, ag), (ao.mm_reduce_scatter_base, rs)):
        got = [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
        assert got == want, fn.__name__


# -- every rule has a call that breaks it ------------------------------------------------------

K, N, M = 256, 16, 4


def _fp(dtype=BF, m=M, k=K, n=N):
    return torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)


def _q(m=M, k=K, n=N):
    return (
        torch.randint(-128, 128, (m, k), dtype=torch.int8),
        torch.randint(-128, 128, (k, n), dtype=torch.int8),
        torch.rand(m, 1),
        torch.rand(1, n) * 1e-3,
    )


def _both(**over):
    """(op name, callable(**kwargs)) for both ops with FP defaults; ``over`` replaces args."""

    def ag(**kw):
        a = {"input": None, "x2": None, "hcom": "local", "world_size": 1, **kw}
        if a["input"] is None:
            a["input"], a["x2"] = _fp()
        return ao.all_gather_base_mm(**a)

    def rs(**kw):
        a = {"input": None, "x2": None, "hcom": "local", "world_size": 1, **kw}
        if a["input"] is None:
            a["input"], a["x2"] = _fp()
        return ao.mm_reduce_scatter_base(**a)

    return [("G", ag), ("R", rs)]


x1_, w_ = _fp()
xq, wq, s1, s2 = _q()
RULE_CASES = [
    # (rule number, kwargs, error type, message fragment)
    (1, {"input": torch.randn(M, K).to(torch.float64), "x2": torch.randn(K, N).double()}, TypeError, "input: dtype"),
    (1, {"input": torch.randn(2, M, K).to(BF), "x2": w_}, ValueError, "input: must be 2-D"),
    (1, {"input": torch.randn(K, M).to(BF).t(), "x2": w_}, ValueError, "input: a transposed"),
    (1, {"input": torch.randn(0, K).to(BF), "x2": w_}, ValueError, "input: must not be empty"),
    (1, {"input": [[1.0]], "x2": w_}, TypeError, "input: must be a torch.Tensor"),
    (2, {"input": x1_, "x2": torch.randn(K, N, 1).to(BF)}, ValueError, "x2: must be 2-D"),
    (2, {"input": x1_, "x2": torch.randn(K, N).half()}, TypeError, "x2: dtype must equal"),
    (2, {"input": x1_, "x2": wq}, TypeError, "x2: dtype must equal"),
    (2, {"input": x1_, "x2": torch.randn(K, 0).to(BF)}, ValueError, "x2: must not be empty"),
    (3, {"input": x1_, "x2": torch.randn(K + 1, N).to(BF)}, ValueError, "x2: shape[0]"),
    (3, {"input": torch.randn(M, 128).to(BF), "x2": torch.randn(128, N).to(BF)}, ValueError, "k = 128"),
    (3, {"input": torch.randn(1, 65535).to(BF), "x2": torch.randn(65535, 1).to(BF)}, ValueError, "k = 65535"),
    (4, {"hcom": ""}, TypeError, "hcom: must be a non-empty"),
    (4, {"hcom": 3}, TypeError, "hcom: must be a non-empty"),
    (4, {"world_size": 3}, ValueError, "world_size: must be 1"),
    (4, {"world_size": 2.0}, TypeError, "world_size: must be an int"),
    (4, {"world_size": 2}, ValueError, "world_size: (2) must equal the size"),
    (5, {"bias": torch.zeros(N).to(BF)}, ValueError, "bias: is not supported"),
    (6, {"x2_scale": s2}, ValueError, "x2_scale: is only for the quantized"),
    (6, {"x1_scale": s1}, ValueError, "x1_scale: is only for the quantized"),
    (6, {"input": xq, "x2": wq, "x1_scale": s1, "comm_mode": "aiv"}, ValueError, "x2_scale: is required"),
    (6, {"input": xq, "x2": wq, "x2_scale": s2.bfloat16(), "comm_mode": "aiv"}, TypeError, "x2_scale: dtype"),
    (6, {"input": xq, "x2": wq, "x2_scale": s2.reshape(-1), "comm_mode": "aiv"}, ValueError, "x2_scale: shape must be (1, n)"),
    (6, {"input": xq, "x2": wq, "x2_scale": s2, "x1_scale": s1.double(), "comm_mode": "aiv"}, TypeError, "x1_scale: dtype"),
    (6, {"input": xq, "x2": wq, "x2_scale": s2, "x1_scale": s1.reshape(-1), "comm_mode": "aiv"}, ValueError, "x1_scale: shape must be (m, 1)"),
    (9, {"comm_turn": 1}, ValueError, "comm_turn: only 0"),
    (9, {"comm_turn": True}, TypeError, "comm_turn: must be an int"),
    (10, {"output_dtype": F16}, ValueError, "output_dtype: is only for the quantized"),
    (10, {"input": xq, "x2": wq, "x2_scale": s2, "output_dtype": F32, "comm_mode": "aiv"}, ValueError, "output_dtype: must be None"),
    (10, {"input": xq, "x2": wq, "x2_scale": trans_quant_param(s2), "output_dtype": BF, "comm_mode": "aiv"}, ValueError, "gives a float16 output"),
    (11, {"comm_mode": "ccu"}, ValueError, "comm_mode: must be None"),
    (11, {"input": xq, "x2": wq, "x2_scale": s2}, ValueError, "comm_mode: the quantized scenario needs"),
    (11, {"input": xq, "x2": wq, "x2_scale": s2, "comm_mode": "ai_cpu"}, ValueError, "comm_mode: the quantized scenario needs"),
]  # fmt: skip


@pytest.mark.parametrize("prefix", ["G", "R"])
@pytest.mark.parametrize("case", range(len(RULE_CASES)))
def test_every_shared_rule_is_enforced(prefix: str, case: int) -> None:
    num, kwargs, exc, frag = RULE_CASES[case]
    fn = dict(_both())[prefix]
    with torch.no_grad(), pytest.raises(exc) as info:
        fn(**kwargs)
    msg = str(info.value)
    assert frag in msg and msg.endswith(f"({prefix}{num})"), msg


def test_g7_g8_gather_index_and_gather_output() -> None:
    x, w = _fp()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^gather_index: only 0 .*\(G7\)$"):
            ao.all_gather_base_mm(x, w, "local", 1, gather_index=1)
        with pytest.raises(TypeError, match=r"^gather_output: must be a bool.*\(G8\)$"):
            ao.all_gather_base_mm(x, w, "local", 1, gather_output=1)


def test_r7_r8_reduce_op_and_m_divisible() -> None:
    x, w = _fp(m=5)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^reduce_op: only 'sum'.*\(R7\)$"):
            ao.mm_reduce_scatter_base(x, w, "local", 1, reduce_op="max")
        # R8 is metadata: raised before the group is looked at
        with pytest.raises(
            ValueError, match=r"^input: m = 5 must be divisible by world_size = 2 \(R8\)$"
        ):
            ao.mm_reduce_scatter_base(x, w, "local", 2)


@pytest.mark.parametrize("prefix", ["G", "R"])
def test_12_inference_only(prefix: str) -> None:
    x, w = _fp()
    fn = dict(_both())[prefix]
    with pytest.raises(ValueError, match=rf"^x2: requires grad.*\({prefix}12\)$"):
        fn(input=x, x2=w.requires_grad_())


@pytest.mark.parametrize("prefix", ["G", "R"])
def test_ascend_only_rules(prefix: str) -> None:
    """fp32, world size 1 and an NZ x2 without 'aiv' are refused on the Ascend backend."""
    check = (
        ao._validate.check_all_gather_base_mm
        if prefix == "G"
        else ao._validate.check_mm_reduce_scatter_base
    )
    x, w = _fp(F32)
    check(x, w, "h", 2)  # portable: fine
    with pytest.raises(TypeError, match=rf"^input: dtype .*Ascend backend.*\({prefix}1\)$"):
        check(x, w, "h", 2, ascend=True)
    x, w = _fp()
    with pytest.raises(
        ValueError, match=rf"^world_size: must be 2, 4 or 8 on Atlas A2, got 1 \({prefix}4\)$"
    ):
        check(x, w, "h", 1, ascend=True)
    with pytest.raises(
        ValueError, match=rf"^x2: a FRACTAL_NZ x2 needs comm_mode='aiv'.*\({prefix}11\)$"
    ):
        check(x, w, "h", 2, ascend=True, x2_format=29)
    kw = {"comm_mode": "aiv"}
    check(x, w, "h", 2, ascend=True, x2_format=29, **kw)


def test_output_specs() -> None:
    """G13 / R13: output and gather_out shapes and dtypes by scenario."""
    from ascend_ops._validate import check_all_gather_base_mm, check_mm_reduce_scatter_base

    x, w = _fp(m=4)
    sp = check_all_gather_base_mm(x, w, "h", 4)
    assert (sp.out_shape, sp.out_dtype, sp.gather_shape, sp.comm_mode) == (
        (16, N),
        BF,
        (16, K),
        "ai_cpu",
    )
    sp = check_all_gather_base_mm(x, w, "h", 4, gather_output=False)
    assert sp.gather_shape == (0,)
    sp = check_mm_reduce_scatter_base(x, w, "h", 4)
    assert (sp.out_shape, sp.out_dtype) == ((1, N), BF)
    for scale, od, want in ((s2, None, BF), (s2, F16, F16), (trans_quant_param(s2), None, F16)):
        sp = check_mm_reduce_scatter_base(
            xq, wq, "h", 2, x2_scale=scale, output_dtype=od, comm_mode="aiv"
        )
        assert sp.out_dtype == want and sp.quantized and sp.out_shape == (M // 2, N)


def test_validation_runs_before_any_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    def boom(*a, **k):
        raise AssertionError("a collective ran")

    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"):
        monkeypatch.setattr(dist, name, boom)
    from ascend_ops import _portable

    monkeypatch.setattr(_portable, "_all_gather_single", boom)
    monkeypatch.setattr(_portable, "_reduce_scatter_single", boom)
    x, w = _fp()
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(G5\)"):
        ao.all_gather_base_mm(x, w, "local", 1, bias=torch.zeros(N).to(BF))


# -- torch.compile(fullgraph=True) ----------------------------------------------------------


def sp_fn(x, xq, s1, w, wq, s2, hcom, ws):
    a, g = ao.all_gather_base_mm(x, w, hcom, ws)
    b, _ = ao.all_gather_base_mm(
        xq, wq, hcom, ws, x1_scale=s1, x2_scale=s2, comm_mode="aiv", gather_output=False
    )
    c = ao.mm_reduce_scatter_base(g, w, hcom, ws)
    d = ao.mm_reduce_scatter_base(
        xq.repeat(ws, 1), wq, hcom, ws, x2_scale=s2, comm_mode="aiv", output_dtype=F16
    )
    return a, g, b, c, d


def check_sp_compiled(backend: str, rank: int, ws: int) -> int:
    from test_compile import CountingBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    counting = CountingBackend(backend)
    compiled = torch.compile(sp_fn, backend=counting, fullgraph=True)
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(K, N, generator=g) / 16).to(BF)
    wq = torch.randint(-128, 128, (K, N), generator=g, dtype=torch.int8)
    s2 = torch.rand(1, N, generator=g) * 1e-3
    hcom = ao.hcom_name()
    with torch.no_grad():
        for m in (3, 5, 9):
            x = torch.randn(m, K, generator=g).to(BF)
            xq = torch.randint(-128, 128, (m, K), generator=g, dtype=torch.int8)
            s1 = torch.rand(m, 1, generator=g) + 0.5
            for t in (x, xq, s1):
                torch._dynamo.mark_dynamic(t, 0)
            got = compiled(x, xq, s1, w, wq, s2, hcom, ws)
            want = sp_fn(x, xq, s1, w, wq, s2, hcom, ws)
            for a, b in zip(got, want, strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    return counting.graphs


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_world_size_one(backend: str) -> None:
    assert check_sp_compiled(backend, 0, 1) == 1


def test_explain_single_opaque_nodes() -> None:
    torch._dynamo.reset()
    x, w = _fp()
    with torch.no_grad():
        ex = torch._dynamo.explain(sp_fn)(x, xq, s1, w, wq, s2, "local", 1)
    torch._dynamo.reset()
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    targets = [str(n.target) for g in ex.graphs for n in g.graph.nodes]
    assert sum("ascend_ops.all_gather_base_mm" in s for s in targets) == 2, targets
    assert sum("ascend_ops.mm_reduce_scatter_base" in s for s in targets) == 2, targets


def _compile_body(rank: int, ws: int, backend: str) -> int:
    torch.set_num_threads(1)
    return check_sp_compiled(backend, rank, ws)


def test_compile_world_size_two() -> None:
    assert run_ranks(2, _compile_body, "aot_eager", timeout=300) == [1, 1]


@pytest.mark.slow
def test_compile_inductor_world_size_one() -> None:
    assert check_sp_compiled("inductor", 0, 1) == 1


def test_validation_still_runs_under_compile() -> None:
    """A broken rule raises at trace time with the same message (not a graph break)."""
    torch._dynamo.reset()

    def fn(x, w):
        return ao.mm_reduce_scatter_base(x, w, "local", 2)

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    x, w = _fp(m=5)
    # torch < 2.9: dynamo's error does not carry the message (ascend_ops._compat)
    msg = r"input: m = 5 .*\(R8\)" if DYNAMO_REPORTS_EXCEPTION_ARGS else r"Observed exception"
    with torch.no_grad(), pytest.raises(Exception, match=msg):
        compiled(x, w)
    torch._dynamo.reset()
