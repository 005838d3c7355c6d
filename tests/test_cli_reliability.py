"""``python -m quant`` under hostile conditions: an ``--out`` that overlaps the model, side files
that are symlinks out of the model, a truncated source, a full disk, SIGTERM / SIGINT / SIGKILL
in the middle of a run. Each failure is its documented exit status and one ``error:`` line; the
model and any earlier output are never changed; nothing is left that a later run does not
remove."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quant.checkpoint import DESCRIPTION_FILE, CheckpointReader
from quant.cli import main

ROOT = Path(__file__).resolve().parent.parent
W = "model.layers.0.mlp.down_proj.weight"


def _model(root: Path, n: int = 32, k: int = 64) -> Path:
    d = root / "model"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({W: torch.randn(n, k, generator=g).bfloat16()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli(*argv: str) -> int:
    return main(["--no-progress", "--scheme", "w8a16", *argv])


def _hidden(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# -- item 1: an --out that overlaps the model is refused, with or without --force ----------------


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize(
    "where,relation",
    [
        ("parent", "contains"),
        ("inside", "is inside"),
        ("same", "is"),
        ("link-to-parent", "contains"),
        ("link-to-model", "is"),
        ("inside-via-link", "is inside"),
    ],
)
def test_out_overlapping_the_model_is_refused(tmp_path, capsys, where, relation, force) -> None:
    top = tmp_path / "X"
    model = _model(top)
    (top / "notes.txt").write_text("the user's other data")
    (tmp_path / "lp").symlink_to(top, target_is_directory=True)
    (tmp_path / "lm").symlink_to(model, target_is_directory=True)
    out = {
        "parent": top,
        "inside": model / "q",
        "same": model,
        "link-to-parent": tmp_path / "lp",
        "link-to-model": tmp_path / "lm",
        "inside-via-link": tmp_path / "lm" / "q",
    }[where]
    before = _digest(tmp_path)
    assert _cli("--model", str(model), "--out", str(out), *(["--force"] if force else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: output ")
    assert f"{relation} the model directory" in err, err
    assert _digest(tmp_path) == before
    assert not (model / "q").exists()
    assert _hidden(tmp_path, out.name) == [] and _hidden(top, out.name) == []


def test_force_never_deletes_what_is_not_an_earlier_output(tmp_path, capsys) -> None:
    model = _model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert _cli("--model", str(model), "--out", str(out), "--force") == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "years of work"
    f = tmp_path / "file"
    f.write_text("x")
    assert _cli("--model", str(model), "--out", str(f), "--force") == 2
    assert "not a directory" in capsys.readouterr().err and f.read_text() == "x"


# -- item 6: side files never come from outside the model directory -----------------------------


def test_side_files_do_not_follow_symlinks_out_of_the_model(tmp_path, capsys) -> None:
    model = _model(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("ssh key")
    (model / "README.md").symlink_to(secret)
    (model / "real").mkdir()
    (model / "real" / "tok.json").write_text('{"tok": 1}')
    (model / "tokenizer.json").symlink_to(model / "real" / "tok.json")
    out = tmp_path / "out"
    assert _cli("--model", str(model), "--out", str(out)) == 0
    assert "not copying" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [DESCRIPTION_FILE, "config.json", "model.safetensors", "tokenizer.json"]
    )
    assert (out / "tokenizer.json").read_text() == '{"tok": 1}'
    assert not (out / "tokenizer.json").is_symlink()


def test_side_files_of_a_hugging_face_cache_snapshot_are_copied(tmp_path) -> None:
    repo = tmp_path / "hub" / "models--org--m"
    snap = repo / "snapshots" / "abc123"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    tmp_model = _model(tmp_path / "build")
    snap.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        blob = blobs / hashlib.sha256(name.encode()).hexdigest()
        blob.write_bytes((tmp_model / name).read_bytes())
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    out = tmp_path / "out"
    assert _cli("--model", str(snap), "--out", str(out)) == 0
    assert (out / "config.json").read_bytes() == (tmp_model / "config.json").read_bytes()


# -- item 7: every failure is an exit status and one line -----------------------------------------


def test_truncated_source_shard_is_exit_2_naming_the_file(tmp_path, capsys) -> None:
    model = _model(tmp_path)
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    out = tmp_path / "out"
    assert _cli("--model", str(model), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {shard}: {W}: truncated: the file has {shard.stat().st_size} bytes, " + (
        f"its header describes {shard.stat().st_size + 10}; this tensor's data ends at byte "
        f"{shard.stat().st_size + 10}\n"
    )
    assert not out.exists() and _hidden(tmp_path, "out") == []


@pytest.mark.parametrize("earlier", [False, True])
def test_disk_full_is_exit_3_and_leaves_the_output_as_it_was(
    tmp_path, capsys, monkeypatch, earlier
) -> None:
    import quant.checkpoint.writer as writer

    model = _model(tmp_path)
    out = tmp_path / "out"
    if earlier:
        assert _cli("--model", str(model), "--out", str(out)) == 0
        capsys.readouterr()
    before = _digest(tmp_path)

    def full(f, data) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer, "_write_all", full)
    assert _cli("--model", str(model), "--out", str(out), "--force") == 3
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and err.count("\n") == 1
    assert "No space left on device (disk full or over quota?)" in err
    assert err.endswith("nothing written, the output is unchanged\n")
    assert _digest(tmp_path) == before and _hidden(tmp_path, "out") == []


def _run_py(code: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_file_size_limit_is_exit_3_without_traceback(tmp_path) -> None:
    """A real failing write (RLIMIT_FSIZE: EFBIG), through ``python -m quant``."""
    model = _model(tmp_path, n=512, k=512)  # 256 KiB of int8 output > the 64 KiB limit
    out = tmp_path / "out"
    code = f"""
        import resource, runpy, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        sys.argv = ["quant", "--no-progress", "--scheme", "w8a16", "--model", {str(model)!r},
                    "--out", {str(out)!r}]
        runpy.run_module("quant", run_name="__main__")
    """
    p = _run_py(code)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 3, err
    assert "Traceback" not in err and err.startswith("error: cannot write "), err
    assert "File too large (disk full or over quota?)" in err
    assert not out.exists() and _hidden(tmp_path, "out") == []


_STALL = """
    import os, sys, time
    import quant.checkpoint
    from quant.cli import main
    add = quant.checkpoint.CheckpointWriter.add
    def stalled(self, *a, **k):
        add(self, *a, **k)
        self.flush()
        open({marker!r}, "w").close()
        time.sleep(120)
    quant.checkpoint.CheckpointWriter.add = stalled
    sys.exit(main(["--no-progress", "--scheme", "w8a16", "--model", {model!r}, "--out", {out!r}]))
"""


def _stalled_run(tmp_path: Path, model: Path, out: Path) -> subprocess.Popen:
    marker = tmp_path / "writing"
    p = _run_py(_STALL.format(marker=str(marker), model=str(model), out=str(out)))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.05)
    return p


@pytest.mark.parametrize(
    "sig,code,msg",
    [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted (SIGINT)")],
)
def test_sigterm_and_sigint_clean_up(tmp_path, sig, code, msg) -> None:
    model = _model(tmp_path)
    out = tmp_path / "out"
    p = _stalled_run(tmp_path, model, out)
    assert _hidden(tmp_path, "out")  # mid-write: the temporary directory exists
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert err == f"error: {msg}; nothing written, the output is unchanged\n"
    assert not out.exists() and _hidden(tmp_path, "out") == []


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path, capsys) -> None:
    model = _model(tmp_path)
    out = tmp_path / "out"
    p = _stalled_run(tmp_path, model, out)
    p.kill()
    p.communicate(timeout=60)
    assert _hidden(tmp_path, "out")  # SIGKILL: nothing can clean up
    assert _cli("--model", str(model), "--out", str(out)) == 0
    assert "left behind by an interrupted run" in capsys.readouterr().err
    assert _hidden(tmp_path, "out") == []
    with CheckpointReader(out) as r:
        assert r.quant_type(W) == "W8A16"
