"""tp_layers.hf: parallelize / load_pretrained on tiny random-weight HF models vs the unswapped
model (every rank builds the same seeded model, swaps it, and compares with its own copy).

Tolerance: fp32 models; the swapped model sums the same products in another order (per-rank
partial sums, then the all-reduce), so logits agree to ~1e-7; we allow 1e-5 absolute (logits
are O(0.1-1) here). Greedy tokens must be identical.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mp_harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.hf

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


# SmolLM2-135M's attention shape (9 q / 3 kv heads of 16) at toy size, tied embeddings, a
# vocab that divides by no TP size
SMOL = dict(
    vocab_size=101,
    hidden_size=144,
    intermediate_size=96,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def make_config(arch: str, **over):
    """Tiny config: hidden 64, 2 layers, vocab 128, 4 heads (2 kv heads where GQA exists);
    ``"smol"``: a Llama of the ``SMOL`` shape."""
    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    kw.update(SMOL if arch == "smol" else {})
    kw.update(over)
    if arch in ("llama", "smol"):
        return transformers.LlamaConfig(num_key_value_heads=kw.pop("num_key_value_heads", 2), **kw)
    if arch == "qwen2":  # q/k/v bias
        return transformers.Qwen2Config(num_key_value_heads=kw.pop("num_key_value_heads", 2), **kw)
    if arch == "mistral":
        return transformers.MistralConfig(
            num_key_value_heads=kw.pop("num_key_value_heads", 1), **kw
        )
    if arch == "gpt_neox":  # fused per-head qkv, biases, parallel residual, GELU MLP
        return transformers.GPTNeoXConfig(**kw)
    raise ValueError(arch)


def make_model(arch: str, seed: int = 0, dtype=torch.float32, **over):
    torch.manual_seed(seed)
    cfg = make_config(arch, **over)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def _ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def run_and_compare(model, ref, ids: torch.Tensor, steps: int = 3, new_tokens: int = 32):
    """Prefill of ids (batch, seq), ``steps`` decode steps with the KV cache (ref's greedy
    token fed to both), then ``new_tokens`` greedy tokens, on the swapped model and its
    unswapped ref, under no_grad: (max |logit error| of each forward, path counts of the
    prefill, of the decode steps, model's tokens, ref's tokens)."""
    import tp_layers as tl

    errs = []
    with torch.no_grad():
        tl.reset_path_counts()
        a, b = model(ids, use_cache=True), ref(ids, use_cache=True)
        prefill = tl.path_counts()
        errs.append((a.logits - b.logits).abs().max().item())
        cache_a, cache_b = a.past_key_values, b.past_key_values
        nxt = b.logits[:, -1:].argmax(-1)
        tl.reset_path_counts()
        for _ in range(steps):
            a = model(nxt, cache=cache_a, use_cache=True)
            b = ref(nxt, cache=cache_b, use_cache=True)
            errs.append((a.logits - b.logits).abs().max().item())
            nxt = b.logits[:, -1:].argmax(-1)
        decode = tl.path_counts()
        kw = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
        kw["attention_mask"] = torch.ones_like(ids)
        got = model.generate(ids, **kw)
        want = ref.generate(ids, **kw)
    return errs, prefill, decode, got, want


def _row_layers(model) -> int:
    import tp_layers as tl

    return sum(isinstance(m, tl.RowParallelLinear) for m in model.modules())


def _swap_body(rank: int, ws: int, arch: str, over: dict) -> dict:
    """Prefill + 3 decode steps with the KV cache, path counters, then 32 greedy tokens."""
    import tp_layers as tl

    model = make_model(arch, **over)
    ref = copy.deepcopy(model)
    tl.parallelize(model)
    rows = _row_layers(model)
    assert rows == 2 * model.config.num_hidden_layers
    ids = _ids()
    errs, prefill, decode, got, want = run_and_compare(model, ref, ids)
    assert max(errs) <= ATOL, f"{arch} ws={ws}: logit errors {errs}"
    if ws == 1:
        assert prefill == {"fused": 0, "unfused": 0, "local": rows}, prefill
        assert decode == {"fused": 0, "unfused": 0, "local": 3 * rows}, decode
    else:
        assert prefill == {"fused": rows, "unfused": 0, "local": 0}, prefill
        assert decode == {"fused": 0, "unfused": 3 * rows, "local": 0}, decode
    assert got.shape == want.shape and torch.equal(got, want), f"{arch} ws={ws}: greedy differs"
    attn = next(m for n, m in model.named_modules() if n.endswith(("0.self_attn", "0.attention")))
    return {
        "err": max(errs),
        "k_proj": type(getattr(attn, "k_proj", None)).__name__,
        "groups": getattr(attn, "num_key_value_groups", None),
        "tokens": got[:, ids.shape[1] :].tolist(),
    }


CASES = [
    ("llama", 1, {}),
    ("llama", 2, {}),
    ("llama", 4, {}),  # 4 heads, 2 kv heads at TP 4: kv heads replicated
    ("qwen2", 2, {}),
    ("mistral", 2, {}),  # 1 kv head: replicated on both ranks
    ("gpt_neox", 2, {}),
]


@pytest.mark.parametrize(("arch", "ws", "over"), CASES, ids=[f"{a}-tp{w}" for a, w, _ in CASES])
def test_swapped_model_matches_unswapped(arch: str, ws: int, over: dict) -> None:
    out = run_ranks(ws, _swap_body, arch, over)
    assert all(o["tokens"] == out[0]["tokens"] for o in out)
    if arch in ("llama", "mistral") and ws > make_config(arch).num_key_value_heads:
        # fewer kv heads than ranks: one whole kv head per rank, groups = local q heads
        assert out[0]["k_proj"] == "HeadReplicatedColumnLinear"
        assert out[0]["groups"] == 4 // ws


# -- load_pretrained ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny tied-embedding Llama saved in 2+ safetensors shards, and its W8A16 quantization."""
    from quant import W8A16, quantize_checkpoint

    root = tmp_path_factory.mktemp("hf")
    model = make_model("llama", seed=3, dtype=torch.bfloat16, tie_word_embeddings=True)
    fdir = root / "float"
    model.save_pretrained(str(fdir), max_shard_size="60KB")
    assert len(list(fdir.glob("*.safetensors"))) >= 2
    assert (fdir / "model.safetensors.index.json").is_file()
    qdir = root / "w8a16"
    quantize_checkpoint(str(fdir), str(qdir), W8A16(), progress=False)
    return {"float": str(fdir), "w8a16": str(qdir)}


def _load_body(rank: int, ws: int, dirs: dict[str, str]) -> list[int]:
    import tp_layers as tl
    from quant import W8A16

    ids = _ids(1, 6)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    ref = transformers.AutoModelForCausalLM.from_pretrained(dirs["float"], dtype=torch.bfloat16)
    ref.eval()
    qref = tl.parallelize(copy.deepcopy(ref), quant=W8A16())
    model = tl.load_pretrained(dirs["float"], dtype=torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # re-tied
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    rep = model.tp_load_report
    assert rep.unexpected == [] and len(rep.files) >= 2
    qmodel = tl.load_pretrained(dirs["w8a16"], dtype=torch.bfloat16)  # from the description
    qload = tl.load_pretrained(dirs["float"], quant=W8A16(), dtype=torch.bfloat16)  # on load
    assert qmodel.model.layers[0].mlp.down_proj.scheme == W8A16()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=0.05, rtol=0.02)
        ql = qref(ids).logits
        assert torch.equal(qmodel(ids).logits, ql)
        assert torch.equal(qload(ids).logits, ql)
        got = model.generate(ids, **kw)
        qgot = qmodel.generate(ids, **kw)
        assert torch.equal(qgot, qref.generate(ids, **kw))
    return got[0].tolist()


@pytest.mark.parametrize("ws", [1, 2])
def test_load_pretrained_matches_in_memory_model(saved_dirs: dict[str, str], ws: int) -> None:
    out = run_ranks(ws, _load_body, saved_dirs)
    assert all(o == out[0] for o in out)
    if ws == 1:
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            saved_dirs["float"], dtype=torch.bfloat16
        ).eval()
        ids = _ids(1, 6)
        with torch.no_grad():
            want = ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert out[0] == want[0].tolist()


# -- errors and plans (one process, fake TP contexts, meta models) ---------------------------


def _meta_model(arch: str = "llama", **over):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(
            make_config(arch, **over), dtype=torch.bfloat16
        )


def _fake_tp(size: int, rank: int = 0):
    from tp_layers import TPContext

    return TPContext(None, rank, size, "fake")


def test_heads_not_divisible_by_tp_is_refused() -> None:
    from tp_layers.hf import parallelize

    with pytest.raises(
        ValueError, match=r"q_proj.*4 heads of size 16 do not split evenly over TP 3"
    ):
        parallelize(_meta_model(num_key_value_heads=1), _fake_tp(3))


def test_meta_swap_and_head_replicated_kv_shards() -> None:
    """On meta, layers are created unloaded; with 2 kv heads at TP 4 rank r loads kv head r//2."""
    from tp_layers.hf import HeadReplicatedColumnLinear, parallelize

    full = torch.arange(2 * 16 * 64, dtype=torch.bfloat16).reshape(32, 64)
    for rank in range(4):
        model = parallelize(_meta_model(), _fake_tp(4, rank))
        attn = model.model.layers[1].self_attn
        assert isinstance(attn.k_proj, HeadReplicatedColumnLinear)
        assert attn.q_proj.weight.device.type == "meta"
        assert attn.num_key_value_groups == 1
        p = attn.k_proj.weight
        dest = torch.empty(p.raw_shape, dtype=p.raw_dtype)
        attn.k_proj.load_into("weight", dest, full)  # what load_weights calls per parameter
        head = rank * 2 // 4
        assert torch.equal(dest, full[head * 16 : (head + 1) * 16])


def test_plan_errors_name_the_entry() -> None:
    from tp_layers.hf import parallelize, resolve_plan

    model = _meta_model()
    with pytest.raises(ValueError, match=r"'model.layers.\*.mlp' -> 'moe_tp_experts'"):
        resolve_plan(model, {"model.layers.*.mlp": "moe_tp_experts"})
    with pytest.raises(ValueError, match=r"'x\.\*' -> 'bogus': unknown style"):
        resolve_plan(model, {"x.*": "bogus"})
    with pytest.raises(ValueError, match="matches no module"):
        resolve_plan(model, {"nothing.here": "colwise"})
    with pytest.raises(
        ValueError, match=r"targets model.layers.0.input_layernorm \(LlamaRMSNorm\)"
    ):
        parallelize(model, _fake_tp(2), plan={"*.input_layernorm": "colwise"})
    plans = resolve_plan(model)  # base_model_tp_plan under "model.", lm_head, embedding
    assert {p.name for p in plans} >= {
        "model.layers.1.self_attn.o_proj",
        "model.layers.0.mlp.up_proj",
    }
    styles = {p.name: p.style for p in plans}
    assert styles.pop("model.embed_tokens") == "embedding_rowwise"
    # the CausalLM's _tp_plan: "colwise_rep" in transformers 4, "colwise_gather_output" in 5
    assert styles.pop("lm_head") in ("colwise_rep", "colwise_gather_output")
    assert all(name.startswith("model.layers.") for name in styles)


def test_user_plan_and_quant_dict() -> None:
    from quant import W8A16
    from tp_layers import ColumnParallelLinear, RowParallelLinear
    from tp_layers.hf import parallelize

    model = make_model("llama", dtype=torch.bfloat16)
    ref = copy.deepcopy(model)
    parallelize(
        model,
        plan={
            "*.mlp.gate_proj": "colwise",
            "*.mlp.up_proj": "colwise",
            "*.mlp.down_proj": "rowwise",
        },
        quant={"*.down_proj": W8A16()},
    )
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, ColumnParallelLinear) and mlp.gate_proj.scheme.name == "FLOAT"
    assert isinstance(mlp.down_proj, RowParallelLinear) and mlp.down_proj.scheme == W8A16()
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, ref(_ids()).logits, atol=0.1, rtol=0.05)


def test_static_w8a8_needs_calibration() -> None:
    from quant import W8A8, ActivationRange
    from tp_layers.hf import parallelize

    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: static W8A8 needs"):
        parallelize(make_model("llama", dtype=torch.bfloat16), quant=W8A8())
    model = make_model("llama", dtype=torch.bfloat16)
    cal = {n: ActivationRange(-4.0, 4.0) for n, m in model.named_modules() if "proj" in n}
    parallelize(model, quant=W8A8(), calibration=cal)
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


def test_import_tp_layers_without_transformers() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import tp_layers\n"
        "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    tp_layers.parallelize\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('parallelize imported without transformers')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


MORE_ARCHS = {
    "qwen3": lambda kw: transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **kw),
    "gemma2": lambda kw: transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, **kw),
    "phi3": lambda kw: transformers.Phi3Config(
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw
    ),
    "olmo2": lambda kw: transformers.Olmo2Config(num_key_value_heads=2, **kw),
    "starcoder2": lambda kw: transformers.Starcoder2Config(num_key_value_heads=2, **kw),
}


def _more_archs_body(rank: int, ws: int) -> dict[str, float]:
    import tp_layers

    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    diffs = {}
    for name, mk in MORE_ARCHS.items():
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(mk(dict(kw)), dtype=torch.float32)
        ref.eval()
        model = tp_layers.parallelize(copy.deepcopy(ref))
        ids = _ids()
        with torch.no_grad():
            diffs[name] = (ref(ids).logits - model(ids).logits).abs().max().item()
            want = ref.generate(ids, max_new_tokens=8, do_sample=False)
            got = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(want, got), name
        assert diffs[name] <= ATOL, (name, diffs[name])
    return diffs


def test_more_architectures_at_tp2() -> None:
    """Qwen3 (per-head q/k norms), Gemma2 (soft-capping), Phi3 (packed qkv / gate_up), OLMo2
    (q/k norms over the full projection), Starcoder2 (biases, GELU MLP) by their own plans."""
    run_ranks(2, _more_archs_body)
