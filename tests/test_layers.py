"""Every layer x scheme x world size {1, 2, 4} x phase vs an unsharded float64 reference."""

from __future__ import annotations

import pytest
import torch
from layer_cases import SCHEMES, make_input, make_linear, reference64, tolerance
from mp_harness import run_ranks

K, N = 256, 64
HEAD, HEADS, KV_HEADS = 16, 8, 2  # qkv: hidden K, q 128 wide, k / v 32 wide


def _build(kind: str, scheme_name: str, bias: bool, seed: int = 0, **kw):
    """The layer (loaded and processed) and, per segment, the full checkpoint tensors."""
    import tp_layers as tl

    scheme = SCHEMES[scheme_name]
    common = {"quant": scheme, "params_dtype": torch.bfloat16, "prefix": f"{kind}.{scheme_name}"}
    if kind == "row":
        layer = tl.RowParallelLinear(K, N, bias=bias, **kw, **common)
        segs = [(None, make_linear(N, K, bias, scheme, seed))]
    elif kind in ("column", "column_gather"):
        layer = tl.ColumnParallelLinear(
            K, N, bias=bias, gather_output=kind == "column_gather", **kw, **common
        )
        segs = [(None, make_linear(N, K, bias, scheme, seed))]
    elif kind == "merged":
        layer = tl.MergedColumnParallelLinear(K, [N, 2 * N], bias=bias, **kw, **common)
        segs = [
            (0, make_linear(N, K, bias, scheme, seed)),
            (1, make_linear(2 * N, K, bias, scheme, seed + 1)),
        ]
    elif kind == "qkv":
        layer = tl.QKVParallelLinear(K, HEAD, HEADS, KV_HEADS, bias=bias, **kw, **common)
        segs = [
            ("q", make_linear(HEADS * HEAD, K, bias, scheme, seed)),
            ("k", make_linear(KV_HEADS * HEAD, K, bias, scheme, seed + 1)),
            ("v", make_linear(KV_HEADS * HEAD, K, bias, scheme, seed + 2)),
        ]
    else:
        raise ValueError(kind)
    params = dict(layer.named_parameters())
    for shard_id, tensors in segs:
        for name, t in tensors.items():
            if name in params:
                params[name].weight_loader(params[name], t, shard_id)
    layer.process_weights_after_loading()
    return layer, segs


def _local_reference(kind: str, rank: int, ws: int, x: torch.Tensor, segs, scheme) -> tuple:
    """This rank's expected output (float64) and tolerance bound, from the full layers."""
    outs, mags = [], []
    for shard_id, t in segs:
        y, mag = reference64(x, t, scheme)
        n = y.shape[-1]
        if kind in ("column", "merged") or (kind == "qkv" and shard_id == "q"):
            loc = n // ws
            y, mag = y[..., rank * loc : (rank + 1) * loc], mag[..., rank * loc : (rank + 1) * loc]
        elif kind == "qkv":  # k / v: heads sharded, or replicated when ws > kv heads
            heads = KV_HEADS
            per = max(heads // ws, 1)
            rep = max(ws // heads, 1)
            start = (rank // rep) * per * HEAD
            y, mag = y[..., start : start + per * HEAD], mag[..., start : start + per * HEAD]
        outs.append(y)
        mags.append(mag)
    return torch.cat(outs, -1), torch.cat(mags, -1)


def _layer_body(
    rank: int, ws: int, kind: str, scheme_name: str, phase_name: str | None, bias: bool
) -> float:
    import tp_layers as tl

    layer, segs = _build(kind, scheme_name, bias)
    shape = (2, 5, K) if phase_name != "decode" else (3, 1, K)
    x = make_input(shape, seed=7)
    x_in = x[..., rank * (K // ws) : (rank + 1) * (K // ws)].contiguous() if kind == "row" else x
    with torch.no_grad(), tl.phase(phase_name):
        y = layer(x_in)
    ref, mag = _local_reference(kind, rank, ws, x, segs, SCHEMES[scheme_name])
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape, (y.shape, ref.shape)
    ratio = ((y.double() - ref).abs() / tolerance(mag, ws, SCHEMES[scheme_name])).max().item()
    assert ratio <= 1.0, f"{kind}/{scheme_name}/{phase_name} rank {rank}: err/tol {ratio:.3f}"
    return ratio


KINDS = [
    ("row", "prefill"),
    ("row", "decode"),
    ("column", None),
    ("column_gather", None),
    ("merged", None),
    ("qkv", None),
]


@pytest.mark.parametrize("ws", [1, 2, 4])
@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize(("kind", "phase_name"), KINDS, ids=[f"{k}-{p}" for k, p in KINDS])
def test_layer_matches_unsharded_reference(
    kind: str, phase_name: str | None, scheme_name: str, ws: int
) -> None:
    run_ranks(ws, _layer_body, kind, scheme_name, phase_name, True)


def _fused_vs_unfused_body(rank: int, ws: int, scheme_name: str, bias: bool) -> None:
    import tp_layers as tl

    layer, _ = _build("row", scheme_name, bias)
    x = make_input((2, 6, K // ws), seed=rank + 11)
    with torch.no_grad():
        with tl.phase("prefill"):
            fused = layer(x)
        with tl.phase("decode"):
            unfused = layer(x)
    if scheme_name in ("fp", "w8a16", "w8a8", "w8a16_g32_asym") and not (
        bias and scheme_name != "w8a8"
    ):
        # same per-rank formula, same rounding, same reduction: bit-identical
        assert torch.equal(fused, unfused), (fused - unfused).abs().max()
    else:  # a float bias is added inside the fused op but after the all-reduce in decode
        torch.testing.assert_close(fused, unfused, rtol=2**-7, atol=2**-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scheme_name", list(SCHEMES))
def test_fused_and_unfused_agree(scheme_name: str, bias: bool) -> None:
    run_ranks(2, _fused_vs_unfused_body, scheme_name, bias)


def _bias_once_body(rank: int, ws: int, scheme_name: str, phase_name: str) -> None:
    """A layer with a large bias and a residual: both must appear exactly once in the sum."""
    import tp_layers as tl

    scheme = SCHEMES[scheme_name]
    layer = tl.RowParallelLinear(K, N, bias=True, quant=scheme, params_dtype=torch.bfloat16)
    t = make_linear(N, K, True, scheme, 3)
    if "bias" in t:
        t["bias"] = torch.full((N,), 100.0, dtype=torch.bfloat16)
    for name, p in layer.named_parameters():
        p.weight_loader(p, t[name])
    x = torch.zeros(2, 3, K // ws, dtype=torch.bfloat16)
    residual = torch.full((2, 3, N), 1000.0, dtype=torch.bfloat16)
    with torch.no_grad(), tl.phase(phase_name):
        y = layer(x, residual=residual)
    from quant.algorithms import dequantize_linear

    _, b = dequantize_linear(dict(t), scheme)
    want = 1000.0 + (b.double() if b is not None else 0.0)
    torch.testing.assert_close(y.double(), want.expand(2, 3, N), rtol=2**-7, atol=0.5)


@pytest.mark.parametrize("phase_name", ["prefill", "decode"])
@pytest.mark.parametrize("scheme_name", ["fp", "w8a16", "w8a8_dynamic"])
def test_bias_and_residual_counted_once(scheme_name: str, phase_name: str) -> None:
    run_ranks(4, _bias_once_body, scheme_name, phase_name)
