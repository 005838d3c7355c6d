"""Every layer traces with torch.compile(fullgraph=True), zero graph breaks, in both phases."""

from __future__ import annotations

import pytest
from layer_cases import make_input, make_linear
from mp_harness import run_ranks
from test_layers import K, N, _build


def _compile_body(rank: int, ws: int, kind: str, scheme_name: str, backend: str) -> None:
    import torch._dynamo

    import tp_layers as tl

    torch._dynamo.reset()
    layer, _ = _build(kind, scheme_name, True)
    k_in = K // ws if kind == "row" else K
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    for phase_name, shape in (("prefill", (2, 4, k_in)), ("decode", (2, 1, k_in))):
        x = make_input(shape, seed=3 + rank)
        with torch.no_grad(), tl.phase(phase_name):
            want = layer(x)
            got = compiled(x)
        if backend == "inductor":  # inductor may fuse the bf16 epilogue differently
            torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-6)
        else:
            assert torch.equal(got, want), (phase_name, (got - want).abs().max())


# aot_eager traces through dynamo and AOTAutograd (a superset of what "eager" checks);
# eager is covered once, inductor once per phase on the row layer (compiles are slow on 2 cores).
@pytest.mark.parametrize("scheme_name", ["fp", "w8a16_g32_asym", "w8a8", "w8a8_dynamic"])
@pytest.mark.parametrize("kind", ["row", "column_gather", "qkv"])
def test_layers_compile_fullgraph(kind: str, scheme_name: str) -> None:
    run_ranks(2, _compile_body, kind, scheme_name, "aot_eager")


def test_row_layer_compiles_with_eager_backend() -> None:
    run_ranks(2, _compile_body, "row", "w8a8_dynamic", "eager")


def test_row_layer_compiles_with_inductor() -> None:
    run_ranks(2, _compile_body, "row", "fp", "inductor", timeout=600)


def _untouchable(module) -> None:
    """Swap every registered parameter of ``module`` for one that raises on any use."""
    import torch
    from torch import nn

    class Untouchable(nn.Parameter):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            raise AssertionError(f"the forward used a registered parameter ({func})")

    for name, p in module._parameters.items():
        if p is not None:
            module._parameters[name] = Untouchable(torch.empty(0), requires_grad=False)


def _run(layer, phase_name: str, x):
    import tp_layers as tl

    with tl.phase(phase_name):
        return layer(x)


def _param_free_body(rank: int, ws: int) -> None:
    import torch

    from tp_layers import TPContext
    from tp_layers.embedding import ParallelLMHead, VocabParallelEmbedding

    cases = [
        (kind, scheme, kw)
        for scheme in ("fp", "w8a8_dynamic")
        for kind, kw in (
            ("row", {}),
            ("row", {"skip_bias_add": True}),
            ("column_gather", {}),
            ("qkv", {}),
            ("row", {"sequence_parallel": True}),
            ("column", {"sequence_parallel": True}),
        )
    ]
    for kind, scheme_name, kw in cases:
        layer, _ = _build(kind, scheme_name, True, **kw)
        k_in = K // ws if kind == "row" else K
        rows = 8 // ws if kw.get("sequence_parallel") and kind == "column" else 8  # token shard
        inputs = {
            ph: make_input(shape, seed=3 + rank)
            for ph, shape in (("prefill", (rows, 4, k_in)), ("decode", (rows, 1, k_in)))
        }
        with torch.no_grad():
            want = {ph: _run(layer, ph, x) for ph, x in inputs.items()}
            _untouchable(layer)
            got = {ph: _run(layer, ph, x) for ph, x in inputs.items()}
        for ph in inputs:
            a, b = want[ph], got[ph]
            a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
            assert all(torch.equal(u, v) for u, v in zip(a, b)), (kind, scheme_name, kw, ph)
    tp = TPContext.from_group()
    vocab, hidden = 100, 16
    w = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0))
    emb = VocabParallelEmbedding(vocab, hidden, tp=tp, params_dtype=torch.float32)
    emb.weight_loader(emb.weight, w)
    head = ParallelLMHead(vocab, hidden, bias=True, tp=tp, params_dtype=torch.float32)
    head.weight_loader(head.weight, w)
    head.weight_loader(head.bias, torch.randn(vocab))
    tied = ParallelLMHead(vocab, hidden, tp=tp, params_dtype=torch.float32).tie_weights(emb)
    ids = torch.arange(vocab).reshape(4, 25)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1))
    want = [emb(ids), head(x), tied(x)]
    for m in (emb, head, tied):
        _untouchable(m)
    assert all(torch.equal(a, b) for a, b in zip((emb(ids), head(x), tied(x)), want))


def test_forward_never_touches_registered_parameters() -> None:
    """The forward reads ShardedModule.param_views only: dynamo before torch 2.8 cannot trace
    the ShardedParameter subclass, so a forward touching one does not compile there."""
    run_ranks(2, _param_free_body)


@pytest.mark.parametrize("scheme_name", ["fp", "w8a16_g32_asym"])
def test_param_views_follow_the_parameters(scheme_name: str) -> None:
    """The views the forward reads are plain tensors on the parameters' storage, also in a
    deepcopy / pickled copy, after ``.to()`` and after a re-load (re-processed)."""
    import copy
    import io

    import torch
    from layer_cases import SCHEMES

    def check(layer) -> None:
        for name, v in layer.param_views.items():
            p = layer._parameters[name]
            assert (v is None) == (p is None)
            if v is not None:
                assert type(v) is torch.Tensor and v.data_ptr() == p.data_ptr()
                assert v.shape == p.shape and v.stride() == p.stride()

    layer, _ = _build("column", scheme_name, True)
    x = make_input((3, K), seed=1)
    with torch.no_grad():
        want = layer(x)
        check(layer)
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        for other in (copy.deepcopy(layer), torch.load(buf, weights_only=False), layer.to("cpu")):
            check(other)
            assert torch.equal(other(x), want)
        layer.weight_loader(
            layer.weight, make_linear(N, K, True, SCHEMES[scheme_name], 9)["weight"]
        )
        assert layer.param_views == {} and not layer._processed
        changed = layer(x)
        check(layer)
        assert not torch.equal(changed, want)
