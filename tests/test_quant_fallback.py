"""``exclude`` / ``fallback``: linears kept FLOAT in a quantized checkpoint, loaded at TP 1
and TP 2 by ``tp_layers.load_pretrained``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mp_harness import run_ranks
from test_quant_accuracy import TEXT, make_model

from quant import W8A8, quantize_checkpoint
from quant.checkpoint import DESCRIPTION_FILE

pytest.importorskip("transformers")


def _logits_body(rank: int, ws: int, qdir: str, ids: torch.Tensor) -> dict:
    import tp_layers as tl

    m = tl.load_pretrained(qdir, dtype=torch.bfloat16)
    schemes = {n: mod.scheme.name for n, mod in m.named_modules() if hasattr(mod, "scheme")}
    with torch.no_grad():
        return {"logits": m(input_ids=ids).logits.float(), "schemes": schemes}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback")
    d = make_model(root)
    calib = root / "calib.txt"
    calib.write_text(TEXT)
    out = root / "q"
    r = quantize_checkpoint(
        d,
        out,
        W8A8(),
        calib=calib,
        calib_samples=4,
        calib_seq_len=32,
        exclude=["*.layers.1.mlp.down_proj"],
        fallback=2,
        progress=False,
        report=True,
    )
    return d, out, r


def test_fallback_writes_float_entries(converted):
    _d, out, r = converted
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert "model.layers.1.mlp.down_proj" in r.excluded
    assert len(r.excluded) == 3  # the glob + the 2 worst by calib output error
    for m in r.excluded:
        assert desc[f"{m}.weight"] == "FLOAT"
        assert m not in r.quantized
    assert desc["model_quant_type"] == "W8A8"
    worst = sorted(r.reports, key=lambda x: x.out_rel_err, reverse=True)
    # the quantized layers left are the better ones
    assert len(r.quantized) == 2 * 7 - 3 and len(worst) == len(r.quantized)


@pytest.mark.parametrize("ws", [1, 2])
def test_fallback_checkpoint_loads_at_tp(converted, ws):
    import transformers

    d, out, r = converted
    ids = torch.randint(2, 20, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    res = run_ranks(ws, _logits_body, str(out), ids)
    for got in res:
        for m in r.excluded:
            assert got["schemes"][m] == "FLOAT"
        assert got["schemes"][r.quantized[0]] == "W8A8"
        err = float(torch.linalg.norm(got["logits"] - want) / torch.linalg.norm(want))
        assert err < 0.1, err
