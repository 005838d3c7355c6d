"""Every layer traces with torch.compile(fullgraph=True), zero graph breaks, in both phases."""

from __future__ import annotations

import pytest
from layer_cases import make_input
from mp_harness import run_ranks
from test_layers import K, _build


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
