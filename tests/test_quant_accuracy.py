"""Accuracy tools end to end on a tiny real transformers Llama with a word-level tokenizer:
``--eval`` perplexity, text / JSONL calibration, SmolLM2-style configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quant.cli import main
from quant.evaluate import evaluate_perplexity

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = (
    "the quick brown fox jumps over the lazy dog and the dog sleeps while the fox runs "
    "far away into the green forest where the birds sing every morning of the year "
) * 6
WORDS = sorted(set(TEXT.split()))
H, LAYERS = 64, 2


def _tokenizer(d: Path) -> None:
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
    )
    fast.save_pretrained(str(d))


def make_model(root: Path, architectures_null: bool = False) -> Path:
    """A float32 tiny Llama (4 heads / 2 kv heads) + tokenizer in root/model."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=H,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(WORDS) + 2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=1,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = root / "model"
    model.save_pretrained(str(d), safe_serialization=True)
    _tokenizer(d)
    if architectures_null:  # as SmolLM2's config.json
        c = json.loads((d / "config.json").read_text())
        c["architectures"] = None
        (d / "config.json").write_text(json.dumps(c))
    return d


def test_cli_eval_prints_float_and_quantized_perplexity(tmp_path, capsys):
    d = make_model(tmp_path)
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    out = tmp_path / "q"
    rc = main(
        [
            *("--model", str(d), "--out", str(out), "--scheme", "w8a16", "--no-progress"),
            *("--eval", str(text), "--eval-window", "32"),
        ]
    )
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    fp = evaluate_perplexity(d, TEXT, window=32).ppl
    q = evaluate_perplexity(out, TEXT, window=32).ppl
    assert f"float {fp:.4f}" in line and f"W8A16 {q:.4f}" in line
    assert f"ratio {q / fp:.4f}" in line


def test_cli_eval_missing_text_fails_before_writing(tmp_path, capsys):
    d = make_model(tmp_path)
    out = tmp_path / "q"
    rc = main(["--model", str(d), "--out", str(out), "--scheme", "w8a16", "--eval", "nope.txt"])
    assert rc == 2 and not out.exists()
    assert "nope.txt" in capsys.readouterr().err
