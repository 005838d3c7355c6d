"""``python -m quant`` end to end on a small sharded model directory made here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quant.calibration import save_activations
from quant.checkpoint import DESCRIPTION_FILE, INDEX_FILE, CheckpointReader
from quant.cli import main

H, INTER, V = 64, 96, 40
LINEARS = {  # module -> (n, k)
    "model.layers.0.self_attn.q_proj": (H, H),
    "model.layers.0.mlp.up_proj": (INTER, H),
    "model.layers.0.mlp.down_proj": (H, INTER),
}


def _make_model(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    d = root / "model"
    d.mkdir()
    t = {
        f"{m}.weight": (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
        for m, (n, k) in LINEARS.items()
    }
    t["model.layers.0.self_attn.q_proj.bias"] = torch.randn(H, generator=g).to(torch.bfloat16)
    t["model.embed_tokens.weight"] = torch.randn(V, H, generator=g).to(torch.bfloat16)
    t["model.layers.0.input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    t["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    t["lm_head.weight"] = torch.randn(V, H, generator=g).to(torch.bfloat16)
    names = sorted(t)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    wmap = {}
    for fname, keys in shards.items():
        save_file({k: t[k] for k in keys}, str(d / fname))
        wmap.update(dict.fromkeys(keys, fname))
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": H}))
    return d


def _calib(root: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    p = root / "calib.safetensors"
    save_activations(p, {m: torch.randn(32, k, generator=g) for m, (_, k) in LINEARS.items()})
    return p


def _run(*argv: str) -> int:
    return main(["--no-progress", *argv])


def _no_leftovers(root: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in root.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    "scheme,extra",
    [("w8a16", []), ("w8a16", ["--group-size", "32"]), ("w8a8_dynamic", []), ("w8a8", ["--calib"])],
)
def test_cli_end_to_end(tmp_path, capsys, scheme, extra):
    model = _make_model(tmp_path)
    out = tmp_path / "out"
    if extra == ["--calib"]:
        extra = ["--calib", str(_calib(tmp_path))]
    assert (
        _run("--model", str(model), "--out", str(out), "--scheme", scheme, "--report", *extra) == 0
    )
    cap = capsys.readouterr()
    assert "quantized 3 layers" in cap.err
    assert "model.layers.0.mlp.down_proj" in cap.out and "w rel err" in cap.out
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    qtype = scheme.upper()
    assert desc["model_quant_type"] == qtype
    assert desc["group_size"] == (32 if "--group-size" in extra else 0)
    for name in (
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        assert desc[name] == "FLOAT"
    assert (out / "config.json").is_file()
    src = CheckpointReader(model)
    with CheckpointReader(out) as r:
        assert set(desc) - {"model_quant_type", "version", "group_size"} == set(r.names())
        assert torch.equal(r.get_tensor("lm_head.weight"), src.get_tensor("lm_head.weight"))
        for m in LINEARS:
            assert desc[f"{m}.weight"] == qtype
            assert r.validate_layer(m).name == qtype
            assert r.get_tensor(f"{m}.weight").dtype == torch.int8
        q = "model.layers.0.self_attn.q_proj"
        if scheme == "w8a8":
            assert r.info(f"{q}.deq_scale").dtype == torch.float32  # bf16 model
            assert f"{q}.bias" not in r and r.info(f"{q}.quant_bias").dtype == torch.int32
        else:
            assert r.get_tensor(f"{q}.bias").dtype == torch.bfloat16


def test_cli_fp16_output_dtype_gives_int64_deq_scale(tmp_path):
    model = _make_model(tmp_path)
    out = tmp_path / "out"
    assert (
        _run(
            "--model",
            str(model),
            "--out",
            str(out),
            "--scheme",
            "w8a8",
            "--dtype",
            "float16",
            "--calib",
            str(_calib(tmp_path)),
            "--max-shard-size",
            "8KB",
        )
        == 0
    )
    assert (out / INDEX_FILE).is_file()
    with CheckpointReader(out) as r:
        assert r.info("model.layers.0.mlp.up_proj.deq_scale").dtype == torch.int64
        assert r.info("model.layers.0.mlp.up_proj.input_scale").dtype == torch.float16
        assert r.info("lm_head.weight").dtype == torch.float16


def test_cli_bad_inputs_leave_no_output(tmp_path, capsys):
    model = _make_model(tmp_path)
    out = tmp_path / "out"
    base = ["--model", str(model), "--out", str(out)]
    cases = [
        (
            ["--model", str(tmp_path / "nope"), "--out", str(out), "--scheme", "w8a16"],
            "model directory not found",
        ),
        ([*base, "--scheme", "w8a8"], "needs calibration data"),
        ([*base, "--scheme", "w8a16", "--group-size", "64"], "does not divide"),
        ([*base, "--scheme", "w8a16", "--group-size", "48"], "multiple of 32"),
        ([*base, "--scheme", "w8a8_dynamic", "--group-size", "32"], "w8a16 only"),
        (
            [*base, "--scheme", "w8a8", "--calib", str(tmp_path / "missing.st")],
            "calib file not found",
        ),
    ]
    bad_calib = tmp_path / "partial.safetensors"
    save_activations(bad_calib, {"model.layers.0.mlp.up_proj": torch.randn(4, H)})
    cases.append(([*base, "--scheme", "w8a8", "--calib", str(bad_calib)], "no inputs for 2"))
    for argv, msg in cases:
        assert _run(*argv) == 2, argv
        assert msg in capsys.readouterr().err, msg
        _no_leftovers(tmp_path, out)
    # unknown scheme: argparse error
    with pytest.raises(SystemExit) as e:
        _run(*base, "--scheme", "w4a4")
    assert e.value.code == 2
    _no_leftovers(tmp_path, out)


def test_cli_refuses_existing_output_without_force(tmp_path, capsys):
    model = _make_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["--model", str(model), "--out", str(out), "--scheme", "w8a16"]
    assert _run(*argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert _run(*argv, "--force") == 2  # not an earlier output: never deleted
    assert "not a quantized checkpoint" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert _run(*argv, "--force") == 0  # an empty directory
    assert _run(*argv, "--force", "--skip", "up_proj") == 0  # an earlier output
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["model.layers.0.mlp.up_proj.weight"] == "FLOAT"
    assert desc["model.layers.0.mlp.down_proj.weight"] == "W8A16"


def test_python_m_quant_help():
    r = subprocess.run(
        [sys.executable, "-m", "quant", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and "--scheme" in r.stdout and "input_min" in r.stdout
