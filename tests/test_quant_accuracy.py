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


def _ckpt_names(d: Path) -> set[str]:
    from quant.checkpoint import CheckpointReader

    with CheckpointReader(d) as r:
        return {n[: -len(".weight")] for n in r.names() if n.endswith("proj.weight")}


@pytest.mark.parametrize("null_arch", [False, True])
def test_text_calibration_records_checkpoint_names(tmp_path, null_arch):
    from quant.calibration import load_calibration

    d = make_model(tmp_path, architectures_null=null_arch)
    p = tmp_path / "calib.txt"
    p.write_text(TEXT)
    cal = load_calibration(p, model_dir=d, samples=3, seq_len=16)
    assert _ckpt_names(d) <= set(cal.activations)
    assert cal.activations["model.layers.0.self_attn.q_proj"].shape == (48, H)


def test_jsonl_calibration_excludes_padding(tmp_path):
    from quant.calibration import collect_activations, load_calibration

    d = make_model(tmp_path)
    prompts = ["the quick brown fox", {"text": "the lazy dog sleeps while the fox runs far"}]
    p = tmp_path / "calib.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in prompts))
    cal = load_calibration(p, model_dir=d, samples=10, seq_len=64)
    q = cal.activations["model.layers.1.mlp.down_proj"]
    assert q.shape[0] == 4 + 9  # real tokens only
    # the same rows as running each prompt alone, unpadded
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    rows = []
    for text in ("the quick brown fox", prompts[1]["text"]):
        ids = tok(text, return_tensors="pt")["input_ids"]
        rows.append(
            collect_activations(model, lambda ids=ids: model(input_ids=ids))[
                "model.layers.1.mlp.down_proj"
            ]
        )
    torch.testing.assert_close(q, torch.cat(rows), rtol=1e-4, atol=1e-5)


def test_calib_errors_name_what_the_file_holds(tmp_path):
    from quant import W8A8, quantize_checkpoint
    from quant.calibration import save_activations

    d = make_model(tmp_path)
    p = tmp_path / "c.safetensors"
    save_activations(p, {"layers.0.self_attn.q_proj": torch.randn(4, H)})
    with pytest.raises(ValueError, match=r"holds 1 entry: layers\.0\.self_attn\.q_proj"):
        quantize_checkpoint(d, tmp_path / "o", W8A8(), calib=p)
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="line 1"):
        quantize_checkpoint(d, tmp_path / "o", W8A8(), calib=bad)
    assert not (tmp_path / "o").exists()


def test_mse_observer_clips_outliers_when_it_pays():
    from quant.algorithms import MinMaxObserver, MSEObserver

    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    x[:3] = 200.0
    mse, mm = MSEObserver(), MinMaxObserver()
    mse.update(x)
    mm.update(x)
    assert mse.range().hi < mm.range().hi
    small = torch.linspace(-1, 1, 1000)
    o = MSEObserver()
    o.update(small)
    assert o.range().hi == pytest.approx(1.0, rel=0.05)


def test_group_size_error_is_one_line_per_cause(tmp_path, capsys):
    d = make_model(tmp_path)  # k = 64 (attention, gate/up) and 128 (down_proj)
    rc = main(
        [
            "--model",
            str(d),
            "--out",
            str(tmp_path / "q"),
            "--scheme",
            "w8a16",
            "--group-size",
            "96",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if "does not divide" in ln]
    assert len(lines) == 2, err  # k = 64 and k = 128, not one line per layer
    assert "12 layer(s)" in err and "2 layer(s)" in err


def test_w8a8_summary_names_the_load_dtype_and_static_warns(tmp_path, capsys, caplog):
    d = make_model(tmp_path)  # float32
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    argv = ["--model", str(d), "--scheme", "w8a8", "--calib", str(calib), "--no-progress"]
    with caplog.at_level("WARNING", logger="quant.convert"):
        assert main([*argv, "--out", str(tmp_path / "q"), "--recipe", "plain"]) == 0
    assert "load it with dtype=torch.bfloat16" in capsys.readouterr().err
    assert "static W8A8 without smoothing" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="quant.convert"):
        assert main([*argv, "--out", str(tmp_path / "q2")]) == 0  # recommended recipe
    assert "without smoothing" not in caplog.text
    desc = json.loads((tmp_path / "q2" / "quant_model_description.json").read_text())
    assert desc["model.layers.0.input_layernorm.weight"] == "FLOAT"  # smoothed


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--scheme", "w8a16"], {"smooth": None, "gptq": False}),
        (["--scheme", "w8a16", "--group-size", "64"], {"smooth": None, "gptq": True}),
        (["--scheme", "w8a8"], {"smooth": 0.8, "gptq": True}),
        (["--scheme", "w8a8_dynamic"], {"smooth": "auto", "gptq": False}),
        (["--scheme", "w8a8", "--recipe", "plain"], {"smooth": None, "gptq": False}),
        (["--scheme", "w8a8_dynamic", "--smooth", "0.5"], {"smooth": 0.5, "gptq": False}),
    ],
)
def test_recommended_recipe_per_scheme(flags, expected):
    from quant.cli import _scheme, build_parser
    from quant.recipes import accuracy_kwargs

    args = build_parser().parse_args(["--model", "m", "--out", "o", "--calib", "c.txt", *flags])
    kw = accuracy_kwargs(args, _scheme(args))
    assert {k: kw[k] for k in expected} == expected
    assert sorted(kw["best_effort"]) == sorted(
        k for k in ("smooth", "gptq") if expected[k] and k not in " ".join(flags)
    )
