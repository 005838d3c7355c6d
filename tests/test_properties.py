"""Property: shard-then-gather is the identity, for every layer kind, scheme and parameter kind.

For a random valid layer (row / column / merged / qkv; FP, W8A16 per-channel and per-group,
W8A8 static and dynamic; any model dtype) and world size ws in {1, 2, 4, 8}, the layer is built
for every rank r with a metadata-only context ``TPContext(None, r, ws, "local")`` (no process
group: construction and weight_loader never communicate; forward is never called). Random full
checkpoint tensors, in any shape / dtype the scheme's TensorSpec accepts (other producers' [n]
per-channel scales, int64 deq_scale, int8 input_offset, float32 scales in a bf16 model, ...),
are loaded through each parameter's ``weight_loader`` (per segment with ``shard_id``, or as one
concatenated tensor for merged / qkv). Then, on the raw (unprocessed) parameters:

* ``param.tp_dim is None`` (replicated): identical on every rank and equal to the full tensor;
* otherwise the ranks' shards, concatenated along ``tp_dim``, equal the full tensor, per
  segment for merged / qkv (rank r holds [seg0_r | seg1_r | ...]); for qkv with fewer kv heads
  than ranks, every rank holds exactly kv head ``r // (ws / kv)``, and the kv head owners
  (``r % (ws / kv) == 0``) concatenate to the full k / v.

"Equal" is bit-exact after the documented conversion to the parameter's raw dtype (scales are
kept in float32; an int64 deq_scale is read as float32 bits).

The op-vs-float64 property (tests/test_op_property.py), the NZ round trip (test_layout.py) and
trans_quant_param (test_quant_param.py) are covered in their own files.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tp_layers as tl
from quant.convention import deq_scale_to_float32, deq_scale_to_int64
from quant.schemes import FP, W8A8, W8A16, Scheme

WORLD_SIZES = (1, 2, 4, 8)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NONZERO = ("weight_scale", "deq_scale", "input_scale")


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator):
    """A valid random checkpoint tensor: finite, scales nonzero."""
    if name == "deq_scale" and dtype == torch.int64:
        return deq_scale_to_int64(torch.rand(shape, generator=g) + 0.01)
    if dtype == torch.int8:
        return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    if dtype == torch.int32:
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int32)
    t = torch.randn(shape, generator=g)
    if name in NONZERO:
        t = t.abs() + 0.01
    return t.to(dtype)


@st.composite
def layer_cases(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["row", "column", "merged", "qkv"]))
    scheme_name = draw(st.sampled_from(["fp", "w8a16", "w8a16_group", "w8a8", "w8a8_dynamic"]))
    ws = draw(st.sampled_from(WORLD_SIZES))
    g = draw(st.sampled_from([32, 64])) if scheme_name == "w8a16_group" else 0
    scheme: Scheme = {
        "fp": FP(),
        "w8a16": W8A16(),
        "w8a16_group": W8A16(group_size=g) if g else None,
        "w8a8": W8A8(),
        "w8a8_dynamic": W8A8(dynamic=True),
    }[scheme_name]
    case: dict = {
        "kind": kind,
        "scheme": scheme,
        "ws": ws,
        # W8A8 outputs fp16 / bf16 only (table 3)
        "dtype": draw(st.sampled_from(DTYPES[:2] if "w8a8" in scheme_name else DTYPES)),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "concatenated": False,
    }
    if kind == "row":
        if g:  # whole groups per rank, and g < k (Q3)
            k = ws * g * draw(st.integers(1 if ws > 1 else 2, 3))
        else:
            k = ws * draw(st.integers(1, 24))
        case.update(k=k, n=draw(st.integers(1, 24)))
        return case
    case["k"] = g * draw(st.integers(2, 4)) if g else draw(st.integers(1, 40))
    if kind == "column":
        case["n"] = ws * draw(st.integers(1, 5))
    elif kind == "merged":
        case["sizes"] = [ws * s for s in draw(st.lists(st.integers(1, 4), min_size=2, max_size=3))]
        case["concatenated"] = draw(st.booleans())
    else:  # qkv: kv heads replicated (kv a proper divisor of ws) or sharded (kv = ws * a)
        if ws > 1 and draw(st.booleans()):
            kv = draw(st.sampled_from([d for d in (1, 2, 4) if d < ws and ws % d == 0]))
        else:
            kv = ws * draw(st.integers(1, 2))
        heads = math.lcm(ws, kv) * draw(st.integers(1, 2))
        case.update(
            head=draw(st.integers(1, 6)), heads=heads, kv=kv, concatenated=draw(st.booleans())
        )
    return case


def _build(case: dict, rank: int) -> tl.ParallelLinearBase:
    tp = tl.TPContext(None, rank, case["ws"], "local")
    kw = {"quant": case["scheme"], "params_dtype": case["dtype"], "tp": tp}
    k, bias = case["k"], case["bias"]
    if case["kind"] == "row":
        return tl.RowParallelLinear(k, case["n"], bias=bias, **kw)
    if case["kind"] == "column":
        return tl.ColumnParallelLinear(k, case["n"], bias=bias, **kw)
    if case["kind"] == "merged":
        return tl.MergedColumnParallelLinear(k, case["sizes"], bias=bias, **kw)
    return tl.QKVParallelLinear(k, case["head"], case["heads"], case["kv"], bias=bias, **kw)


def _segments(case: dict) -> list[tuple[object, int, int]]:
    """Per segment: (shard_id, full n, replicas: how many ranks hold the same slice)."""
    ws = case["ws"]
    if case["kind"] in ("row", "column"):
        return [(None, case["n"], 1)]
    if case["kind"] == "merged":
        return [(i, n, 1) for i, n in enumerate(case["sizes"])]
    h, kv = case["head"], case["kv"]
    rep = ws // kv if ws >= kv else 1
    return [("q", case["heads"] * h, 1), ("k", kv * h, rep), ("v", kv * h, rep)]


def _checkpoint(case: dict, choose: Callable[[tuple, str], Any]) -> dict[str, list[torch.Tensor]]:
    """name -> one full checkpoint tensor per segment, each in a drawn accepted shape / dtype.
    Replicated tensors (per-tensor input scale / offset) are the same for every segment, as a
    merged layer requires."""
    g = torch.Generator().manual_seed(case["seed"])
    segs = _segments(case)
    out: dict[str, list[torch.Tensor]] = {}
    for spec in case["scheme"].tensor_specs(segs[0][1], case["k"], case["bias"], case["dtype"]):
        shape = choose(spec.allowed_shapes(), f"{spec.name} shape")
        dtype = choose(spec.allowed_dtypes(), f"{spec.name} dtype")
        if spec.name.startswith("input_"):  # per-tensor: one value shared by all segments
            out[spec.name] = [_random_tensor(spec.name, shape, dtype, g)] * len(segs)
        else:
            out[spec.name] = [
                _random_tensor(spec.name, (n, *shape[1:]), dtype, g) for _, n, _ in segs
            ]
    return out


def _as_raw(name: str, t: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    """A full checkpoint tensor as the parameter stores it before processing."""
    if name == "deq_scale":
        t = deq_scale_to_float32(t)
    return t.to(p.raw_dtype).reshape(t.shape[0], *p.spec.shape[1:])


@settings(max_examples=200, deadline=None)
@given(case=layer_cases(), data=st.data())
def test_shard_then_gather_is_the_full_tensor(case: dict, data: st.DataObject) -> None:
    _check_shard_then_gather(case, lambda opts, label: data.draw(st.sampled_from(opts), label))


SCHEMES = {
    "fp": FP(),
    "w8a16": W8A16(),
    "w8a16_g32": W8A16(group_size=32),
    "w8a8": W8A8(),
    "w8a8_dynamic": W8A8(dynamic=True),
}


@pytest.mark.parametrize("scheme_name", sorted(SCHEMES))
@pytest.mark.parametrize(
    ("ws", "kv"), [(ws, kv) for ws in (2, 4, 8) for kv in (1, 2, 4) if kv < ws and ws % kv == 0]
)
def test_qkv_replicated_kv_heads_every_combination(scheme_name: str, ws: int, kv: int) -> None:
    """Every (ws, kv < ws) pair explicitly (random draws rarely hit kv > 1 with replication)."""
    case = {
        "kind": "qkv",
        "scheme": SCHEMES[scheme_name],
        "ws": ws,
        "dtype": torch.bfloat16,
        "bias": True,
        "seed": ws * 10 + kv,
        "concatenated": False,
        "k": 64,
        "head": 3,
        "heads": 2 * ws,
        "kv": kv,
    }
    rng = random.Random(case["seed"])
    for concatenated in (False, True):
        _check_shard_then_gather({**case, "concatenated": concatenated}, lambda o, _: rng.choice(o))


def _check_shard_then_gather(case: dict, choose: Callable[[tuple, str], Any]) -> None:
    ws = case["ws"]
    layers = [_build(case, r) for r in range(ws)]
    full = _checkpoint(case, choose)
    segs = _segments(case)
    for layer in layers:
        params = layer.checkpoint_params()
        assert set(params) == set(full), (sorted(params), sorted(full))
        for name, tensors in full.items():
            p = params[name]
            if case["concatenated"]:  # one fused checkpoint tensor (gate_up_proj, qkv_proj)
                whole = tensors[0] if p.tp_dim is None else torch.cat(tensors, 0)
                p.weight_loader(p, whole)
            else:
                for (shard_id, _, _), t in zip(segs, tensors):
                    p.weight_loader(p, t, shard_id)

    for name, tensors in full.items():
        ps = [layer.checkpoint_params()[name] for layer in layers]
        dim = ps[0].tp_dim
        assert all(p.tp_dim == dim for p in ps) and all(p.shape == p.raw_shape for p in ps)
        if dim is None:  # replicated: the full tensor on every rank
            expected = _as_raw(name, tensors[0], ps[0]).reshape(ps[0].raw_shape)
            for r, p in enumerate(ps):
                assert torch.equal(p.data, expected), f"{name}: rank {r} differs (replicated)"
            continue
        if case["kind"] == "row":
            assert dim == 1
            gathered = torch.cat([p.data for p in ps], dim)
            assert torch.equal(gathered, _as_raw(name, tensors[0], ps[0])), name
            continue
        assert dim == 0  # column kinds: along n, segment by segment
        local = layers[0].output_sizes_local
        # the distinct slices tile each segment exactly
        assert [loc * (ws // rep) for loc, (_, _, rep) in zip(local, segs)] == [
            n for _, n, _ in segs
        ]
        pieces = [torch.split(p.data, local, 0) for p in ps]
        for i, ((shard_id, n, rep), t) in enumerate(zip(segs, tensors)):
            want = _as_raw(name, t, ps[0])
            assert want.shape[0] == n
            owners = range(0, ws, rep)  # one rank per distinct slice
            gathered = torch.cat([pieces[r][i] for r in owners], 0)
            assert torch.equal(gathered, want), f"{name}: segment {shard_id!r} differs"
            for r in range(ws):  # replicas (qkv kv heads) hold their owner's slice
                head = r // rep
                ref = want[head * local[i] : (head + 1) * local[i]]
                assert torch.equal(pieces[r][i], ref), f"{name}: rank {r} segment {shard_id!r}"
