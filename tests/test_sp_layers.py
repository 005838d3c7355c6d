"""Sequence-parallel layers (token-sharded activations) vs the unsharded float64 reference:
every layer kind x scheme x world size {2, 4} x token count (divisible by ws and not) x phase,
with the path each forward took; the token split itself; the errors."""

from __future__ import annotations

import pytest
import torch
from layer_cases import SCHEMES, make_input, make_linear, reference64, tolerance
from mp_harness import run_ranks
from test_layers import K, N, _local_reference
from test_layers import _build as _build_column

# the row layer's local k must reach the SP kernels' 256 (G3) at TP 4 for its fused path
K_ROW = 1024

SP_SCHEMES = ["fp", "w8a16", "w8a8", "w8a8_dynamic"]
FUSED = {"fp", "w8a8_dynamic"}  # the schemes the SP kernels take
KINDS = ["column", "merged", "qkv", "row"]


def _build(kind: str, scheme_name: str, bias: bool, **kw):
    """The layer, loaded and processed, and its full checkpoint tensors per segment."""
    if kind != "row":
        return _build_column(kind, scheme_name, bias, **kw)
    import tp_layers as tl

    scheme = SCHEMES[scheme_name]
    layer = tl.RowParallelLinear(
        K_ROW, N, bias=bias, quant=scheme, params_dtype=torch.bfloat16, prefix="row", **kw
    )
    t = make_linear(N, K_ROW, bias, scheme, 0)
    for name, p in layer.named_parameters():
        p.weight_loader(p, t[name])
    layer.process_weights_after_loading()
    return layer, [(None, t)]


def _row_input(x: torch.Tensor, rank: int, ws: int) -> torch.Tensor:
    return x[..., rank * (K_ROW // ws) : (rank + 1) * (K_ROW // ws)].contiguous()


def _check(y: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, ws: int, scheme_name: str, what):
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape, (what, y.shape, ref.shape)
    if y.numel() == 0:  # a rank without tokens (m < ws)
        return
    ratio = ((y.double() - ref).abs() / tolerance(mag, ws, SCHEMES[scheme_name])).max().item()
    assert ratio <= 1.0, f"{what}: err/tol {ratio:.3f}"


def _sp_body(rank: int, ws: int, scheme_name: str) -> dict:
    """All kinds, token counts and phases for one scheme; returns the path counts per phase."""
    import tp_layers as tl

    scheme = SCHEMES[scheme_name]
    paths: dict[str, dict[str, int]] = {}
    for kind in KINDS:
        layer, segs = _build(kind, scheme_name, True, sequence_parallel=True)
        k = K_ROW if kind == "row" else K
        for shape in ((8, k), (5, k), (3, 2, k)):  # m divisible by ws, not, a middle dim
            m = shape[0]
            x = make_input(shape, seed=m + 7)
            start, length = tl.token_shard(m, ws, rank)
            ref, mag = _local_reference(kind, rank, ws, x, segs, scheme)
            if kind == "row":  # all tokens, this rank's k columns in; its tokens out
                x_in = _row_input(x, rank, ws)
                ref, mag = ref.narrow(0, start, length), mag.narrow(0, start, length)
            else:  # this rank's tokens in; all tokens, its columns out
                x_in = tl.split_tokens(x)
                assert x_in.shape[0] == length
            for phase_name in ("prefill", "decode"):
                tl.reset_path_counts()
                with torch.no_grad(), tl.phase(phase_name):
                    y = layer(x_in) if kind == "row" else layer(x_in, num_tokens=m)
                _check(y, ref, mag, ws, scheme_name, f"{kind} {shape} {phase_name} rank {rank}")
                got = {k: v for k, v in tl.path_counts().items() if v}
                paths.setdefault(f"{kind}-{phase_name}", got)
                assert paths[f"{kind}-{phase_name}"] == got, (kind, phase_name, got)
    return paths


@pytest.mark.parametrize("ws", [2, 4])
@pytest.mark.parametrize("scheme_name", SP_SCHEMES)
def test_sp_layers_match_unsharded_reference(scheme_name: str, ws: int) -> None:
    fused = scheme_name in FUSED
    for paths in run_ranks(ws, _sp_body, scheme_name):
        for kind in KINDS:
            op = "rs" if kind == "row" else "ag"
            want_prefill = f"{op}_fused" if fused else f"{op}_unfused"
            assert paths[f"{kind}-prefill"] == {want_prefill: 1}, (kind, paths)
            assert paths[f"{kind}-decode"] == {f"{op}_unfused": 1}, (kind, paths)


def _residual_body(rank: int, ws: int, scheme_name: str) -> None:
    """Row layer: bias and a token-sharded residual each added once per token, fused or not."""
    import tp_layers as tl
    from quant.algorithms import dequantize_linear

    layer, segs = _build("row", scheme_name, True, sequence_parallel=True)
    x = make_input((7, K_ROW), seed=2)
    x_in = _row_input(x, rank, ws)
    start, length = tl.token_shard(7, ws, rank)
    residual = torch.full((length, layer.output_size), 50.0, dtype=torch.bfloat16)
    ref, mag = reference64(x, segs[0][1], SCHEMES[scheme_name])
    ref, mag = ref[start : start + length] + 50.0, mag[start : start + length] + 50.0
    for phase_name in ("prefill", "decode"):
        with torch.no_grad(), tl.phase(phase_name):
            y = layer(x_in, residual=residual)
        _check(y, ref, mag, ws, scheme_name, f"residual {phase_name} rank {rank}")
    # skip_bias_add: the bias is returned, not added
    tl_layer = tl.RowParallelLinear(
        K_ROW, N, quant=SCHEMES[scheme_name], params_dtype=torch.bfloat16,
        skip_bias_add=True, sequence_parallel=True,
    )  # fmt: skip
    for name, p in tl_layer.named_parameters():
        p.weight_loader(p, segs[0][1][name])
    with torch.no_grad(), tl.phase("prefill"):
        y, b = tl_layer(x_in)
    _, bias = dequantize_linear(dict(segs[0][1]), SCHEMES[scheme_name])
    if bias is not None:
        assert b is not None
        _check(y + b, ref - 50.0, mag, ws, scheme_name, f"skip_bias_add rank {rank}")


@pytest.mark.parametrize("scheme_name", ["fp", "w8a8_dynamic", "w8a16"])
def test_sp_row_bias_and_residual_once(scheme_name: str) -> None:
    run_ranks(4, _residual_body, scheme_name)


def _split_body(rank: int, ws: int) -> None:
    import tp_layers as tl

    for m in (0, 1, 3, 8, 9):
        x = torch.arange(m * 3, dtype=torch.float32).reshape(m, 3) + 1
        part = tl.split_tokens(x)
        start, length = tl.token_shard(m, ws, rank)
        assert torch.equal(part, x[start : start + length])
        assert torch.equal(tl.gather_tokens(part, num_tokens=m), x)
        # sum over ranks of (rank + 1) * x, this rank's rows
        got = tl.reduce_scatter_tokens(x * (rank + 1))
        assert torch.equal(got, (x * sum(range(1, ws + 1)))[start : start + length])
    assert [tl.token_shard(5, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 1), (5, 0)]


@pytest.mark.parametrize("ws", [2, 4])
def test_split_gather_reduce_scatter_tokens(ws: int) -> None:
    run_ranks(ws, _split_body)


def _errors_body(rank: int, ws: int) -> dict[str, str]:
    import tp_layers as tl

    col, _ = _build("column", "fp", True, sequence_parallel=True)
    row, _ = _build("row", "fp", True, sequence_parallel=True)
    errors = {}

    def err(name: str, fn) -> None:
        try:
            fn()
        except (ValueError, TypeError) as e:
            errors[name] = str(e)

    x = make_input((5, K), seed=1)
    err("shard", lambda: col(x[:1], num_tokens=5))  # both ranks: not their share of 5
    err("num_tokens", lambda: col(tl.split_tokens(x), num_tokens=-1))
    err("residual", lambda: row(make_input((5, K_ROW // ws), 1), residual=make_input((5, N), 1)))
    err(
        "gather", lambda: tl.ColumnParallelLinear(K, 64, gather_output=True, sequence_parallel=True)
    )
    err(
        "row_input",
        lambda: tl.RowParallelLinear(K, 64, input_is_parallel=False, sequence_parallel=True),
    )
    return errors


def test_sp_errors_before_any_collective() -> None:
    for e in run_ranks(2, _errors_body):
        assert "shard of 5 tokens over TP 2 has" in e["shard"] and "num_tokens" in e["shard"], e
        assert "num_tokens must be an int >= 0" in e["num_tokens"]
        assert "residual must be" in e["residual"]
        assert "sequence_parallel needs input_is_parallel=True" in e["row_input"]


def _compile_body(rank: int, ws: int, kind: str, scheme_name: str) -> None:
    import torch._dynamo

    import tp_layers as tl

    torch._dynamo.reset()
    layer, _ = _build(kind, scheme_name, True, sequence_parallel=True)
    x = make_input((6, K_ROW if kind == "row" else K), seed=3)
    x_in = _row_input(x, rank, ws) if kind == "row" else tl.split_tokens(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for phase_name in ("prefill", "decode"):
        with torch.no_grad(), tl.phase(phase_name):
            assert torch.equal(compiled(x_in), layer(x_in)), phase_name


@pytest.mark.parametrize(("kind", "scheme_name"), [("column", "w8a8_dynamic"), ("row", "fp")])
def test_sp_layers_compile_fullgraph(kind: str, scheme_name: str) -> None:
    run_ranks(2, _compile_body, kind, scheme_name)
