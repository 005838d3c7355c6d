"""torch.compile(fullgraph=True) of the fused op and the unfused all-reduce (CONTRACT.md C11).

Backends "eager", "aot_eager" and "inductor" on CPU, at world size 1 (hcom "local") and on 2
gloo ranks: no graph break, the eager result, and one graph for every m in {3, 5, 9, 17} (the
m dims are marked dynamic, so a recompile per m fails the test; a specialization of a marked
dim fails it too). Inductor results are compared exactly as well: the op is one opaque custom
op node whose kernel is the eager one, and the compiled functions do no arithmetic around it.
Inductor compiles are slow on 2 cores, so it compiles one function (all scenarios together).
"""

from __future__ import annotations

import pytest
import torch
from mp_harness import run_ranks

import ascend_ops as ao
from ascend_ops import trans_quant_param
from ascend_ops._compat import DYNAMO_REPORTS_EXCEPTION_ARGS

BF = torch.bfloat16
K, N, G = 96, 24, 32
MS = (3, 5, 9, 17)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is handed, then delegates."""

    def __init__(self, inner: str) -> None:
        self.inner = inner
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        if self.inner == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.inner)(gm, example_inputs)


def _weights() -> dict:
    g = torch.Generator().manual_seed(1)
    s = torch.rand(N, generator=g) * 1e-3 + 1e-4
    return {
        "w_fp": (torch.randn(K, N, generator=g) / K**0.5).to(BF),
        "w_i8": torch.randint(-128, 128, (K, N), generator=g, dtype=torch.int8),
        "a_scale": (torch.rand(K // G, N, generator=g) * 0.01 + 0.001).to(BF),
        "a_offset": torch.randint(-4, 4, (K // G, N), generator=g).to(BF),
        "d_bf16": s.to(BF),
        "d_packed": trans_quant_param(s),
        "bias_i32": torch.randint(-500, 500, (N,), generator=g, dtype=torch.int32),
    }


def _inputs(m: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = {
        "x": torch.randn(m, K, generator=g).to(BF),
        "xq": torch.randint(-128, 128, (m, K), generator=g, dtype=torch.int8),
        "pt": torch.rand(m, generator=g) + 0.5,
        "x3": torch.randn(m, N, generator=g).to(BF),
    }
    for t in d.values():
        torch._dynamo.mark_dynamic(t, 0)
    return d


# The compiled functions: hcom is a str argument (a constant for dynamo, guarded on).
def fp_fn(x, x3, w_fp, hcom):
    return ao.mm_all_reduce_base(x, w_fp, hcom, x3=x3)


def w8a16_fn(x, w_i8, a_scale, a_offset, hcom):
    return ao.mm_all_reduce_base(
        x, w_i8, hcom, antiquant_scale=a_scale, antiquant_offset=a_offset, antiquant_group_size=G
    )


def w8a8_fn(xq, pt, x3, w_i8, d_bf16, bias_i32, hcom):
    return ao.mm_all_reduce_base(
        xq, w_i8, hcom, bias=bias_i32, dequant_scale=d_bf16, pertoken_scale=pt, x3=x3
    )


def w8a8_packed_fn(xq, w_i8, d_packed, hcom):
    return ao.mm_all_reduce_base(xq, w_i8, hcom, dequant_scale=d_packed)


def all_reduce_fn(x, hcom):
    return ao.all_reduce(x, hcom)


def everything_fn(x, xq, pt, x3, w_fp, w_i8, a_scale, a_offset, d_bf16, bias_i32, hcom):
    """All three scenarios and the unfused all-reduce in one graph (one inductor compile)."""
    a = fp_fn(x, x3, w_fp, hcom)
    b = w8a16_fn(x, w_i8, a_scale, a_offset, hcom)
    c = w8a8_fn(xq, pt, x3, w_i8, d_bf16, bias_i32, hcom)
    return a, b, c, all_reduce_fn(b, hcom)


FUNCS = {
    "fp": (fp_fn, ("x", "x3", "w_fp")),
    "w8a16": (w8a16_fn, ("x", "w_i8", "a_scale", "a_offset")),
    "w8a8": (w8a8_fn, ("xq", "pt", "x3", "w_i8", "d_bf16", "bias_i32")),
    "w8a8_packed": (w8a8_packed_fn, ("xq", "w_i8", "d_packed")),
    "all_reduce": (all_reduce_fn, ("x",)),
    "everything": (
        everything_fn,
        ("x", "xq", "pt", "x3", "w_fp", "w_i8", "a_scale", "a_offset", "d_bf16", "bias_i32"),
    ),
}


def _as_tuple(out: object) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def check_compiled(name: str, backend: str, hcom: str, rank: int = 0) -> int:
    """Compile FUNCS[name] with fullgraph, run it for every m in MS and compare it with eager.
    Returns the number of graphs compiled. Raises on a graph break or a mismatch."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn, names = FUNCS[name]
    counting = CountingBackend(backend)
    compiled = torch.compile(fn, backend=counting, fullgraph=True)
    w = _weights()
    with torch.no_grad():
        for m in MS:
            t = {**w, **_inputs(m, seed=100 * rank + m)}
            args = [t[a] for a in names]
            got = _as_tuple(compiled(*args, hcom))
            want = _as_tuple(fn(*args, hcom))
            assert len(got) == len(want)
            for g_, w_ in zip(got, want, strict=True):
                assert g_.dtype == w_.dtype and g_.shape == w_.shape, (name, m)
                torch.testing.assert_close(g_, w_, rtol=0, atol=0, msg=f"{name} {backend} m={m}")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == counting.graphs
    torch._dynamo.reset()
    return counting.graphs


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", ["fp", "w8a16", "w8a8", "w8a8_packed", "all_reduce"])
def test_compile_world_size_one(name: str, backend: str) -> None:
    assert check_compiled(name, backend, ao.hcom_name()) == 1


def test_compile_inductor_world_size_one() -> None:
    assert check_compiled("everything", "inductor", ao.hcom_name()) == 1


def test_explain_reports_no_graph_break() -> None:
    torch._dynamo.reset()
    w = _weights()
    t = {**w, **_inputs(5, seed=0)}
    fn, names = FUNCS["everything"]
    with torch.no_grad():
        ex = torch._dynamo.explain(fn)(*[t[a] for a in names], ao.hcom_name())
    torch._dynamo.reset()
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    # the op and the all-reduce are single opaque nodes of the graph
    targets = [str(n.target) for g in ex.graphs for n in g.graph.nodes]
    assert sum("ascend_ops.mm_all_reduce_base" in s for s in targets) == 3, targets
    assert sum("ascend_ops.all_reduce" in s for s in targets) == 1, targets


def test_validation_still_runs_under_compile() -> None:
    """Violations are raised at trace time with the same message (not a graph break)."""
    torch._dynamo.reset()
    w = _weights()
    compiled = torch.compile(fp_fn, backend="eager", fullgraph=True)
    x = torch.randn(4, K).to(BF)
    # torch < 2.9: dynamo's error does not carry the message (ascend_ops._compat)
    msg = r"x3: .*\(C7\)" if DYNAMO_REPORTS_EXCEPTION_ARGS else r"Observed exception"
    with pytest.raises(Exception, match=msg):
        compiled(x, torch.zeros(4, N + 1).to(BF), w["w_fp"], ao.hcom_name())
    torch._dynamo.reset()


def _compile_body(rank: int, ws: int, name: str, backend: str) -> int:
    torch.set_num_threads(1)
    return check_compiled(name, backend, ao.hcom_name(), rank)


@pytest.mark.parametrize(
    "name,backend",
    [
        ("everything", "eager"),
        ("everything", "aot_eager"),
        ("w8a8_packed", "aot_eager"),
        ("everything", "inductor"),
    ],
)
def test_compile_world_size_two(name: str, backend: str) -> None:
    graphs = run_ranks(2, _compile_body, name, backend, timeout=300)
    assert graphs == [1, 1]
