"""tp_layers.hf beyond the linear layers: vocab-parallel embedding / lm_head in parallelize and
load_pretrained, pad_heads for head counts that do not split, plan keys, the checkpoint dtype,
and a TP x DP layout (two TP sub-groups), each against the unswapped model."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from mp_harness import run_ranks
from test_hf import _fake_tp, make_config, make_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

ATOL = 1e-5


def _greedy(model, ids: torch.Tensor, n: int = 32) -> torch.Tensor:
    kw = {"max_new_tokens": n, "do_sample": False, "pad_token_id": 0, "min_new_tokens": n}
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def _pad_heads_body(rank: int, ws: int, tied: bool) -> dict:
    import tp_layers as tl
    from tp_layers.embedding import ParallelLMHead, VocabParallelEmbedding

    ref = make_model("smol", tie_word_embeddings=tied)
    model = tl.parallelize(copy.deepcopy(ref), pad_heads=True)
    attn = model.model.layers[0].self_attn
    assert isinstance(model.model.embed_tokens, VocabParallelEmbedding)
    assert isinstance(model.lm_head, ParallelLMHead)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (model(ids).logits - ref(ids).logits).abs().max().item()
        got, want = _greedy(model, ids), _greedy(ref, ids)
    assert err <= ATOL, err
    assert torch.equal(got, want), (got, want)
    return {
        "q_local": attn.q_proj.output_size_local // 16,
        "groups": attn.num_key_value_groups,
        "tokens": got[:, ids.shape[1] :].tolist(),
    }


@pytest.mark.parametrize(("ws", "tied"), [(2, True), (4, True), (2, False)])
def test_pad_heads_token_identical(ws: int, tied: bool) -> None:
    """9 q / 3 kv heads padded to 12 / 4 (one zero kv group): fp32, 32 greedy tokens equal."""
    out = run_ranks(ws, _pad_heads_body, tied)
    assert all(o["tokens"] == out[0]["tokens"] for o in out)
    assert all(len(t) == 32 for t in out[0]["tokens"])
    assert out[0]["q_local"] == 12 // ws and out[0]["groups"] == 3


def test_heads_refusal_names_the_ways_out() -> None:
    from tp_layers.hf import parallelize

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(make_config("smol"))
    with pytest.raises(ValueError, match=r"9 heads of size 16 .*pad_heads=True.*plan="):
        parallelize(model, _fake_tp(2))
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # untouched


def test_pad_heads_logs_overhead(caplog: pytest.LogCaptureFixture) -> None:
    from tp_layers.hf import parallelize
    from tp_layers.hf.heads import padded_head_counts

    assert padded_head_counts(9, 3, 2) == (12, 4)
    assert padded_head_counts(9, 3, 3) == (9, 3)
    assert padded_head_counts(9, 3, 8) == (24, 8)
    assert padded_head_counts(14, 2, 4) == (28, 4)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(make_config("smol"))
    with caplog.at_level(logging.INFO, logger="tp_layers.hf.swap"):
        parallelize(model, _fake_tp(4, 3), pad_heads=True)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "9 q / 3 kv heads to 12 / 4" in msg and "+33%" in msg, msg
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (3 * 16, 144) and attn.o_proj.weight.shape == (144, 48)
    assert attn.k_proj.weight.shape == (16, 144)  # 4 kv heads over 4 ranks


def test_plan_keys_relative_to_model_or_base_model() -> None:
    from test_hf import _meta_model

    from tp_layers import ColumnParallelLinear, RowParallelLinear
    from tp_layers.hf import parallelize, resolve_plan

    model = _meta_model()
    a = resolve_plan(model, {"layers.*.mlp.up_proj": "colwise"})
    b = resolve_plan(model, {"model.layers.*.mlp.up_proj": "colwise"})
    assert (
        [p.name for p in a]
        == [p.name for p in b]
        == [
            "model.layers.0.mlp.up_proj",
            "model.layers.1.mlp.up_proj",
        ]
    )
    with pytest.raises(ValueError, match=r"matches no module.*did you mean 'model.layers.\*.mlp"):
        resolve_plan(model, {"layer.*.mlp.up_proj": "colwise"})
    plan = {"layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"}
    parallelize(model, _fake_tp(2), plan=plan)
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp.gate_proj, ColumnParallelLinear)
    assert isinstance(mlp.down_proj, RowParallelLinear)


@pytest.fixture(scope="module")
def smol_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The 9 / 3-head model saved in float32 (tied), in bf16 (untied), and quantized (W8A16
    per channel and per 32-group)."""
    root = tmp_path_factory.mktemp("smol")
    wide = {"hidden_size": 288, "head_dim": 32, "intermediate_size": 128}  # 32-wide groups
    make_model("smol", seed=4, **wide).save_pretrained(str(root / "fp32"))
    untied = make_model("smol", seed=5, tie_word_embeddings=False, **wide).to(torch.bfloat16)
    untied.save_pretrained(str(root / "bf16"))
    from quant import W8A16, quantize_checkpoint

    dirs = {"fp32": str(root / "fp32"), "bf16": str(root / "bf16")}
    for name, scheme in (("w8a16", W8A16()), ("w8a16g", W8A16(group_size=32))):
        dirs[name] = str(root / name)
        quantize_checkpoint(dirs["fp32"], dirs[name], scheme, progress=False)
    return dirs


def _load_body(rank: int, ws: int, dirs: dict[str, str]) -> dict:
    import tp_layers as tl
    from quant import W8A16

    out = {}
    for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ref = transformers.AutoModelForCausalLM.from_pretrained(dirs[kind], dtype=dtype).eval()
        model = tl.load_pretrained(dirs[kind], pad_heads=True)  # dtype from the checkpoint
        assert model.dtype == dtype and model.model.embed_tokens.weight.dtype == dtype
        emb = model.model.embed_tokens
        assert emb.weight.shape[0] == emb.num_embeddings_padded // ws
        ids = torch.randint(0, 101, (1, 6), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            tol = ATOL if dtype == torch.float32 else 0.05
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=tol, rtol=0.02)
            if dtype == torch.float32:
                assert torch.equal(_greedy(model, ids), _greedy(ref, ids))
        out[kind] = model.tp_load_report.bytes_read
    # quantized through the padding: on load (float weight padded, then quantized), from an
    # msmodelslim directory (stored tensors padded: zero rows, edge scales), and in memory
    for scheme, qdir in ((W8A16(), "w8a16"), (W8A16(group_size=32), "w8a16g")):
        qref = tl.parallelize(
            transformers.AutoModelForCausalLM.from_pretrained(dirs["fp32"]).eval(),
            quant=scheme,
            pad_heads=True,
        )
        q = tl.load_pretrained(dirs["fp32"], quant=scheme, pad_heads=True)
        qd = tl.load_pretrained(dirs[qdir], pad_heads=True)
        assert qd.model.layers[0].self_attn.o_proj.scheme == scheme
        with torch.no_grad():
            want = qref(ids).logits
            assert torch.equal(q(ids).logits, want)
            torch.testing.assert_close(qd(ids).logits, want, atol=1e-5, rtol=1e-5)
    return out


@pytest.mark.parametrize("ws", [1, 2])
def test_load_pretrained_pad_heads_and_dtype(smol_dirs: dict[str, str], ws: int) -> None:
    run_ranks(ws, _load_body, smol_dirs)


def test_vocab_sharding_memory_per_rank() -> None:
    """Per-rank parameter bytes with the full plan (embedding + lm_head sharded) vs the linear
    layers only: lower by (1 - 1/tp) of both vocab matrices (untied), within the padding."""
    from tp_layers.hf import parallelize

    def per_rank_bytes(plan_vocab: bool, tp: int) -> int:
        with torch.device("meta"):
            m = transformers.AutoModelForCausalLM.from_config(
                make_config("smol", vocab_size=1000, tie_word_embeddings=False),
                dtype=torch.bfloat16,
            )
        plan = None
        if not plan_vocab:
            base = dict(m.config.base_model_tp_plan)
            plan = {"model." + k: v for k, v in base.items()}
        parallelize(m, _fake_tp(tp), plan=plan, pad_heads=True)
        return sum(p.numel() * p.element_size() for p in m.parameters())

    vocab_bytes = 2 * 1000 * 144 * 2
    for tp in (2, 4):
        saved = per_rank_bytes(False, tp) - per_rank_bytes(True, tp)
        padded = -(-1000 // (64 * tp)) * 64 * tp
        assert saved == vocab_bytes - 2 * (padded // tp) * 144 * 2
        assert saved >= vocab_bytes * (1 - 1 / tp) * 0.9


def _tp_dp_body(rank: int, ws: int) -> dict:
    """4 ranks: TP groups {0, 1} and {2, 3} (TP within a node), DP across them; each TP
    group runs its own batch and checks it against the unsharded model."""
    import torch.distributed as dist

    import tp_layers as tl

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_rank = rank // 2
    tp = tl.TPContext.from_group(groups[dp_rank])
    assert (tp.size, tp.rank) == (2, rank % 2)
    ref = make_model("smol", seed=7)
    model = tl.parallelize(copy.deepcopy(ref), tp, pad_heads=True)
    ids = torch.randint(0, 101, (2, 4), generator=torch.Generator().manual_seed(10 + dp_rank))
    with torch.no_grad():
        err = (model(ids).logits - ref(ids).logits).abs().max().item()
        got, want = _greedy(model, ids, 8), _greedy(ref, ids, 8)
    assert err <= ATOL and torch.equal(got, want), err
    return {"dp": dp_rank, "tokens": got.tolist()}


def test_tp2_dp2_on_four_ranks() -> None:
    out = run_ranks(4, _tp_dp_body)
    assert out[0]["tokens"] == out[1]["tokens"] and out[2]["tokens"] == out[3]["tokens"]
    assert out[0]["tokens"] != out[2]["tokens"]  # two groups, two different batches
