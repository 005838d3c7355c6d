"""``tp_layers.parallelize(model, sequence_parallel=True)`` on small random Llama / Qwen2 models
(fp32) vs the unswapped model: prefill and decode logits, 32 greedy tokens, the token-sharded
hidden states between the decoder layers and the paths taken.

Sizes: hidden 256 and intermediate 512, so the region entries (q_proj / gate_proj, k = 256) and,
at TP 2, down_proj (local k = 256) reach the SP kernels' k >= 256 (G3) and run fused; o_proj
(local k = 256 / tp) uses the separate reduce-scatter. 2 x 7 tokens do not divide by 4.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mp_harness import run_ranks  # noqa: E402
from test_hf import ATOL, _ids, make_model, run_and_compare  # noqa: E402

pytestmark = pytest.mark.hf

SIZES = {"hidden_size": 256, "intermediate_size": 512}


def _sp_body(rank: int, ws: int, arch: str) -> dict:
    import tp_layers as tl

    model = make_model(arch, **SIZES)
    ref = copy.deepcopy(model)
    tl.parallelize(model, sequence_parallel=True)
    ids = _ids()
    m = ids.numel()
    shapes = []
    model.model.layers[1].register_forward_pre_hook(
        lambda _m, args: shapes.append(tuple(args[0].shape))
    )
    errs, prefill, decode, got, want = run_and_compare(model, ref, ids)
    return {
        "err": max(errs),
        "equal": got.shape == want.shape and torch.equal(got, want),
        "tokens": got[:, ids.shape[1] :].tolist(),
        "layer_in": shapes[0],
        "shard": (tl.token_shard(m, ws, rank)[1], 256),
        "prefill": {k: v for k, v in prefill.items() if v},
        "decode": {k: v for k, v in decode.items() if v},
        "phase_after": tl.current_phase(),
    }


CASES = [("llama", 2), ("llama", 4), ("qwen2", 2), ("qwen2", 4)]


@pytest.mark.parametrize(("arch", "ws"), CASES, ids=[f"{a}-tp{w}" for a, w in CASES])
def test_sequence_parallel_model_matches_unswapped(arch: str, ws: int) -> None:
    out = run_ranks(ws, _sp_body, arch)
    layers = 2
    fc2 = "rs_fused" if 512 // ws >= 256 else "rs_unfused"
    want_prefill = {"ag_fused": 2 * layers}
    want_prefill[fc2] = layers
    want_prefill["rs_unfused"] = want_prefill.get("rs_unfused", 0) + layers
    for r in out:
        assert r["err"] <= ATOL, f"{arch} tp{ws}: logits differ by {r['err']:.3g}"
        assert r["equal"], f"{arch} tp{ws}: greedy tokens differ"
        assert r["tokens"] == out[0]["tokens"]
        assert r["layer_in"] == r["shard"], (r["layer_in"], r["shard"])  # token-sharded
        assert r["prefill"] == want_prefill, r["prefill"]
        assert r["decode"] == {"ag_unfused": 3 * 2 * layers, "rs_unfused": 3 * 2 * layers}
        assert r["phase_after"] is None


def _refused_body(rank: int, ws: int) -> str:
    import tp_layers as tl

    model = make_model("llama", **SIZES)
    plan = {"model.layers.*.self_attn.o_proj": "rowwise_split_input"}
    try:
        tl.parallelize(model, plan=plan, sequence_parallel=True)
    except ValueError as e:
        assert not any(isinstance(m, tl.RowParallelLinear) for m in model.modules())
        return str(e)
    return ""


def test_sequence_parallel_refuses_what_it_cannot_serve() -> None:
    for msg in run_ranks(2, _refused_body):
        assert "sequence_parallel" in msg, msg
