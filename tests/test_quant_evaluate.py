"""``quant.evaluate_perplexity``: windowed perplexity against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quant.evaluate import evaluate_perplexity, window_spans

V = 7


class Bigram(nn.Module):
    """logits[t] = table[ids[t]]: the prediction ignores every earlier token."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


class PrefixCount(nn.Module):
    """logits[t] = [number of tokens seen in the window up to t, 0, 0, ...]: depends on where
    the window starts (the context a window sees)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        out = torch.zeros(b, s, V)
        out[..., 0] = torch.arange(1, s + 1, dtype=torch.float32)
        return out


class NoVocab(nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.float()


def _log_softmax(row: list[float], j: int) -> float:
    return row[j] - math.log(sum(math.exp(v) for v in row))


def test_window_spans_score_each_target_once():
    assert window_spans(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert window_spans(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, w, s in [(10, 4, 1), (33, 8, 3), (5, 16, 16), (17, 4, 4)]:
        targets = [t for _, e, f in window_spans(n, w, s) for t in range(f, e)]
        assert len(targets) == len(set(targets))
        if s < w:  # overlapping windows score every target but the first token
            assert targets == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        window_spans(10, 4, 5)
    with pytest.raises(ValueError, match="window"):
        window_spans(10, 1, 1)


def test_bigram_perplexity_matches_hand_computation():
    model = Bigram()
    ids = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5]
    table = model.table.detach().tolist()
    # non-overlapping windows of 4: targets 1, 2, 3 | 5, 6, 7 | 9
    targets = [1, 2, 3, 5, 6, 7, 9]
    nll = -sum(_log_softmax(table[ids[t - 1]], ids[t]) for t in targets)
    r = evaluate_perplexity(model, torch.tensor(ids), window=4)
    assert r.tokens == 7 and r.windows == 3
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll / 7), rel=1e-5)
    # overlapping windows: every target once; a bigram's score does not depend on context
    all_nll = -sum(_log_softmax(table[ids[t - 1]], ids[t]) for t in range(1, 10))
    r2 = evaluate_perplexity(model, ids, window=4, stride=1)
    assert r2.tokens == 9
    assert r2.ppl == pytest.approx(math.exp(all_nll / 9), rel=1e-5)


def test_context_dependent_model_sees_only_its_window():
    # logits (c, 0, ..., 0) where c = position in window + 1: target token 0 gets
    # log p = c - log(e^c + V - 1), any other token -log(e^c + V - 1)
    ids = [0, 2, 0, 0, 5, 0]
    r = evaluate_perplexity(PrefixCount(), ids, window=3, stride=2)

    # spans: (0,3,1) targets 1,2 from positions 0,1 (c=1,2); (2,5,3) targets 3,4 from window
    # positions 0,1 (c=1,2); (4,6,5) target 5 from window position 0 (c=1)
    def lp(c: int, tok: int) -> float:
        return (c if tok == 0 else 0.0) - math.log(math.exp(c) + V - 1)

    hand = -(lp(1, 2) + lp(2, 0) + lp(1, 0) + lp(2, 5) + lp(1, 0))
    assert r.tokens == 5 and r.windows == 3
    assert r.nll == pytest.approx(hand, rel=1e-6)


def test_tokenizer_and_bad_inputs():
    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            return {"input_ids": torch.tensor([[ord(c) % V for c in text]])}

    text = "hello world"
    ids = [ord(c) % V for c in text]
    assert evaluate_perplexity(Bigram(), text, tokenizer=Tok(), window=4).nll == pytest.approx(
        evaluate_perplexity(Bigram(), ids, window=4).nll
    )
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_perplexity(Bigram(), text)
    with pytest.raises(ValueError, match="nothing to score"):
        evaluate_perplexity(Bigram(), [1])
    with pytest.raises(FileNotFoundError, match="model directory"):
        evaluate_perplexity("/nonexistent/dir", ids)
    with pytest.raises(ValueError, match="logits"):
        evaluate_perplexity(NoVocab(), ids)


def _tiny_llama(root, tie: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    d = root / f"model-tie{int(tie)}"
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(d))
    return d


@pytest.mark.parametrize("tie", [False, True])
def test_load_model_float_matches_transformers(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    from quant.evaluate import load_model

    d = _tiny_llama(tmp_path, tie)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    got = load_model(d)
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, ref(input_ids=ids).logits)
    if tie:
        assert got.lm_head.weight is got.model.embed_tokens.weight


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8_dynamic", "w8a8"])
def test_load_model_quantized_matches_parallel_layers_at_tp1(tmp_path, scheme):
    """quant's own loader (QuantLinear) and tp_layers.load_pretrained (parallel layers, TP 1)
    run the same per-scheme formula on the same checkpoint tensors: same logits."""
    from quant import W8A8, W8A16, QuantLinear, quantize_checkpoint
    from quant.calibration import Calibration
    from quant.evaluate import load_model
    from tp_layers import load_pretrained

    d = _tiny_llama(tmp_path, False)
    cfg = {"w8a16": W8A16(group_size=32), "w8a8_dynamic": W8A8(dynamic=True), "w8a8": W8A8()}
    cal = None
    if scheme == "w8a8":
        g = torch.Generator().manual_seed(2)
        cal = Calibration()
        for layer in range(2):
            for m, k in [
                ("self_attn.q_proj", 64),
                ("self_attn.k_proj", 64),
                ("self_attn.v_proj", 64),
                ("self_attn.o_proj", 64),
                ("mlp.gate_proj", 64),
                ("mlp.up_proj", 64),
                ("mlp.down_proj", 128),
            ]:
                cal.activations[f"model.layers.{layer}.{m}"] = torch.randn(16, k, generator=g)
    out = tmp_path / "q"
    quantize_checkpoint(d, out, cfg[scheme], calib=cal, progress=False)
    got = load_model(out)
    n_q = sum(isinstance(m, QuantLinear) for m in got.modules())
    assert n_q == 14
    ref = load_pretrained(out, dtype=torch.bfloat16)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = got(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    fp = evaluate_perplexity(d, ids[0], window=12).ppl
    assert evaluate_perplexity(out, ids[0], window=12).ppl != fp  # quantized, not the float


def test_load_model_missing_tensor_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    from quant.evaluate import load_model

    d = _tiny_llama(tmp_path, False)
    f = d / "model.safetensors"
    t = load_file(str(f))
    del t["model.norm.weight"]
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_model(d)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path)


def test_prefix_is_context_only_and_defaults_to_the_tokenizers_bos():
    ids = [1, 2, 0, 3]

    def nll(shift: int) -> float:  # PrefixCount: target j is predicted at position j - 1 + shift
        return -sum(_log_softmax([j + shift] + [0.0] * (V - 1), ids[j]) for j in range(1, 4))

    plain = evaluate_perplexity(PrefixCount(), ids, window=4)
    with_bos = evaluate_perplexity(PrefixCount(), ids, window=4, prefix=[5])
    assert plain.nll == pytest.approx(nll(0)) and plain.tokens == 3
    assert with_bos.nll == pytest.approx(nll(1)) and with_bos.tokens == 3

    class BosTok:  # adds <bos> = 5 before any text, like Gemma's tokenizer
        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            row = ([5] if add_special_tokens else []) + [int(c) for c in text]
            return {"input_ids": torch.tensor([row]) if return_tensors else row}

    by_text = evaluate_perplexity(PrefixCount(), "1203", tokenizer=BosTok(), window=4)
    assert by_text.nll == pytest.approx(with_bos.nll)
    none = evaluate_perplexity(PrefixCount(), "1203", tokenizer=BosTok(), window=4, prefix=[])
    assert none.nll == pytest.approx(plain.nll)


def test_text_calibration_sequences_start_with_the_tokenizers_prefix(tmp_path, monkeypatch):
    import quant.calibration as qc

    class BosTok:
        def __call__(self, text, add_special_tokens=True, **_):
            return {"input_ids": ([5] if add_special_tokens else []) + [int(c) for c in text]}

    monkeypatch.setattr(qc, "_tokenizer", lambda _dir: BosTok())
    f = tmp_path / "c.txt"
    f.write_text("1234567")
    ids, mask = qc._tokenize_file(f, None, samples=8, seq_len=4)
    assert ids.tolist() == [[5, 1, 2, 3], [5, 4, 5, 6], [5, 7, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
