"""tp_layers.load_pretrained on a tiny Gemma 3 text model (one kv head replicated over TP 2,
tied lm_head, the scaled embedding's non-persistent ``embed_scale`` buffer recomputed after the
meta build), float and W8A8 dynamic, against the unsharded model."""

from __future__ import annotations

import pytest
import torch
from mp_harness import run_ranks
from test_quant_gemma import TEXT, _make

from quant import W8A8, quantize_checkpoint

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf


def _ids(d: str) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(d)
    return tok(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :40]


def _load_body(rank: int, ws: int, float_dir: str, quant_dir: str) -> dict[str, float]:
    import tp_layers as tl
    from quant.evaluate import load_model

    ids = _ids(float_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    model = tl.load_pretrained(float_dir, dtype=torch.float32)
    emb = model.model.embed_tokens
    assert float(emb.embed_scale) == pytest.approx(64**0.5)
    q_tp = tl.load_pretrained(quant_dir, dtype=torch.bfloat16)
    q_one = load_model(quant_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = model(input_ids=ids).logits
        qa, qb = q_tp(input_ids=ids).logits.float(), q_one(input_ids=ids).logits.float()
    return {
        "float": float((got - want).abs().max()),
        "quant": float(torch.linalg.norm(qa - qb) / torch.linalg.norm(qb)),
    }


def test_gemma3_loads_at_tp2(tmp_path) -> None:
    """Float: equal to transformers' model up to fp32 rounding. W8A8 dynamic at TP 2 vs the
    one-process quant loader: close, not equal (each rank quantizes its half of o_proj's /
    down_proj's input with its own per-token scale)."""
    _, d = _make(tmp_path)
    q = tmp_path / "w8a8_dynamic"
    quantize_checkpoint(d, q, W8A8(dynamic=True), progress=False)
    out = run_ranks(2, _load_body, str(d), str(q))
    assert all(o["float"] <= 1e-4 for o in out), out
    assert all(o["quant"] < 0.05 for o in out), out
