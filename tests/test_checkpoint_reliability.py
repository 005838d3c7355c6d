"""Checkpoint files that change, lie or break: every case is refused with an error naming the file
(and tensor), shards are read through the descriptor their header came from, paths from the
index stay inside the directory, and the writer's commit is durable, umask-respecting and
recoverable after a crash. Only public names that existed before these checks are imported at
module level (``ValueError`` subclasses are matched by message)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tp_layers as tl
from quant.checkpoint import DESCRIPTION_FILE, INDEX_FILE, CheckpointReader, CheckpointWriter

ROOT = Path(__file__).resolve().parent.parent
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _two_shards(d: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "a.weight": torch.randn(8, 16, generator=g),
        "b.weight": torch.randn(4, 16, generator=g).bfloat16(),
        "c.weight": torch.randn(16, 16, generator=g),
    }
    d.mkdir(parents=True, exist_ok=True)
    save_file({"a.weight": t["a.weight"]}, str(d / SHARD1))
    save_file({"b.weight": t["b.weight"], "c.weight": t["c.weight"]}, str(d / SHARD2))
    wmap = {"a.weight": SHARD1, "b.weight": SHARD2, "c.weight": SHARD2}
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return t


# -- item 3: a shard replaced or rewritten between its header and its data ---------------------


def test_shard_replaced_by_rename_after_the_header_is_refused(tmp_path: Path) -> None:
    t = _two_shards(tmp_path)
    with CheckpointReader(tmp_path) as r:
        assert torch.equal(r.get_tensor("c.weight"), t["c.weight"])
        # rsync / a re-run of the converter: a new file with other offsets renamed over it
        new = tmp_path / "new.tmp"
        save_file({"b.weight": torch.zeros(4, 16).bfloat16(), "c.weight": torch.ones(16, 16)}, new)
        os.replace(new, tmp_path / SHARD2)
        with pytest.raises(ValueError, match=rf"{SHARD2}: c\.weight: replaced or removed"):
            r.get_tensor("c.weight")
        with pytest.raises(ValueError, match=rf"{SHARD2}: b\.weight: replaced"):
            r.tensor("b.weight").read(0, 1, 2)
        assert torch.equal(r.get_tensor("a.weight"), t["a.weight"])  # the other shard is fine


def test_shard_rewritten_in_place_is_refused(tmp_path: Path) -> None:
    _two_shards(tmp_path)
    with CheckpointReader(tmp_path) as r:
        path = tmp_path / SHARD1
        data = bytearray(path.read_bytes())
        data[-4:] = b"\0\0\0\0"
        with open(path, "r+b") as f:  # same inode, new bytes (cp over it, an editor, ...)
            f.write(data + b"\0" * 8)
        with pytest.raises(ValueError, match=rf"{SHARD1}: a\.weight: modified while being read"):
            r.get_tensor("a.weight")


# -- item 5: every error names the file (and the tensor) -----------------------------------------


def _shard2(d: Path) -> Path:
    return d / SHARD2


def _header_len(p: Path) -> int:
    return int.from_bytes(p.read_bytes()[:8], "little")


def _corrupt_entry(p: Path, name: str, key: str, value: object) -> None:
    data = p.read_bytes()
    n = _header_len(p)
    header = json.loads(data[8 : 8 + n])
    header[name][key] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    p.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


CORRUPTIONS = {
    "empty shard": (lambda d: _shard2(d).write_bytes(b""), SHARD2, "empty file"),
    "truncated data": (
        lambda d: _shard2(d).write_bytes(_shard2(d).read_bytes()[:-100]),
        SHARD2,
        r"[bc]\.weight: truncated: the file has",
    ),
    "truncated header length": (
        lambda d: _shard2(d).write_bytes(b"\x10\x00\x00"),
        SHARD2,
        "truncated: 3 bytes",
    ),
    "header length past the end": (
        lambda d: _shard2(d).write_bytes((10**6).to_bytes(8, "little") + b"{}"),
        SHARD2,
        "header length 1000000 exceeds the file size",
    ),
    "header length absurd": (
        lambda d: _shard2(d).write_bytes((2**62).to_bytes(8, "little") + b"{}"),
        SHARD2,
        "exceeds safetensors' limit",
    ),
    "header not JSON": (
        lambda d: _shard2(d).write_bytes((8).to_bytes(8, "little") + b"{not js}"),
        SHARD2,
        "corrupt header: not valid JSON",
    ),
    "unknown dtype": (
        lambda d: _corrupt_entry(_shard2(d), "c.weight", "dtype", "Q4"),
        SHARD2,
        r"c\.weight: unsupported dtype 'Q4'",
    ),
    "shape does not match the span": (
        lambda d: _corrupt_entry(_shard2(d), "c.weight", "shape", [16, 17]),
        SHARD2,
        r"c\.weight: corrupt header: data_offsets",
    ),
    "index not JSON": (
        lambda d: (d / INDEX_FILE).write_text("{'weight_map': 1"),
        INDEX_FILE,
        "shard index: not valid JSON",
    ),
    "index a list": (lambda d: (d / INDEX_FILE).write_text("[]"), INDEX_FILE, "shard index"),
    "index without weight_map": (
        lambda d: (d / INDEX_FILE).write_text('{"metadata": {}}'),
        INDEX_FILE,
        "no 'weight_map'",
    ),
    "index names the wrong shard": (
        lambda d: (d / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": SHARD2}})),
        INDEX_FILE,
        rf"a\.weight: weight_map says {SHARD2}",
    ),
    "description not JSON": (
        lambda d: (d / DESCRIPTION_FILE).write_text('{"model_quant_type": W8A8}'),
        DESCRIPTION_FILE,
        "quant description: not valid JSON",
    ),
    "description a list": (
        lambda d: (d / DESCRIPTION_FILE).write_text('["W8A8"]'),
        DESCRIPTION_FILE,
        "quant description: expected a JSON object",
    ),
    "description group_size": (
        lambda d: (d / DESCRIPTION_FILE).write_text('{"group_size": "big"}'),
        DESCRIPTION_FILE,
        "group_size: expected an int",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_every_checkpoint_error_names_the_file(tmp_path: Path, case: str) -> None:
    corrupt, file, what = CORRUPTIONS[case]
    d = tmp_path / "ckpt"
    _two_shards(d)
    corrupt(d)
    with pytest.raises(ValueError, match=rf"{d / file}: .*{what}") as ei:
        CheckpointReader(d)
    assert "AttributeError" not in str(ei.value) and "\n" not in str(ei.value)
    # the loader says the same (no "unreadable safetensors file (AttributeError ...)")
    with pytest.raises(tl.CheckpointError, match=rf"{d / file}: .*{what}") as ei:
        tl.load_weights(torch.nn.Module(), d)
    assert "unreadable" not in str(ei.value)


def test_description_entry_and_layer_errors_name_file_and_tensor(tmp_path: Path) -> None:
    _two_shards(tmp_path)
    desc = {"model_quant_type": "W8A16", "a.weight": ["W8A16"], "c.weight": "W7A3"}
    (tmp_path / DESCRIPTION_FILE).write_text(json.dumps(desc))
    with CheckpointReader(tmp_path) as r:
        with pytest.raises(ValueError, match=rf"{DESCRIPTION_FILE}: a\.weight: expected a quant"):
            r.quant_type("a.weight")
        with pytest.raises(ValueError, match=rf"{DESCRIPTION_FILE}: c\.weight: .*W7A3"):
            r.validate_layer("c")


# -- item 6: paths from the index stay inside the checkpoint -------------------------------------


@pytest.mark.parametrize(
    "escape", ["../outside.safetensors", "ABS", "sub/../../outside.safetensors"]
)
def test_weight_map_paths_outside_the_directory_are_refused(tmp_path: Path, escape: str) -> None:
    outside = tmp_path / "outside.safetensors"
    save_file({"a.weight": torch.ones(2)}, str(outside))  # valid: it must not even be opened
    d = tmp_path / "ckpt"
    d.mkdir()
    escape = str(outside) if escape == "ABS" else escape
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": escape}}))
    opened: list[str] = []
    real_open = os.open

    def spy(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    os.open = spy
    try:
        with pytest.raises(ValueError, match=rf"{INDEX_FILE}: a\.weight: .*leaves the checkpoint"):
            CheckpointReader(d)
    finally:
        os.open = real_open
    assert not [p for p in opened if "outside" in p]


# -- item 7: the writer's commit is durable, umask-respecting, recoverable -----------------------


def test_commit_fsyncs_files_and_directory_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(a, b) -> None:
        events.append(("rename", f"{os.fspath(a)} -> {os.fspath(b)}"))
        real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    src = tmp_path / "side.json"
    src.write_text("{}")
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes="1KB") as wr:
        for i in range(3):
            wr.add(f"t{i}", torch.ones(200))
        wr.copy_file(src)
        wr.commit("FLOAT")
    final = [i for i, (k, v) in enumerate(events) if k == "rename" and v.endswith(f"-> {out}")]
    assert len(final) == 1, events
    tmp = events[final[0]][1].split(" -> ")[0]
    synced_before = {v for k, v in events[: final[0]] if k == "fsync"}
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 6  # 3 shards, index, description, side file
    for name in files:  # shards are fsync'ed as written (shard-N), then renamed in the dir
        if name.startswith("model-"):
            name = f"shard-{int(name[6:11]) - 1:05d}.safetensors"
        assert f"{tmp}/{name}" in synced_before, (name, events)
    assert tmp in synced_before  # the directory itself, after its entries
    assert ("fsync", str(tmp_path)) in events[final[0] :]  # the rename itself


def test_output_permissions_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with CheckpointWriter(tmp_path / "out") as wr:
            wr.add("a", torch.ones(2))
            wr.commit("FLOAT")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def _earlier_output(out: Path) -> dict[str, bytes]:
    with CheckpointWriter(out) as wr:
        wr.add("old", torch.arange(4.0))
        wr.commit("FLOAT")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_force_failure_between_the_renames_keeps_the_old_output(tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    before = _earlier_output(out)
    real_rename = os.rename

    def rename(a, b) -> None:
        if os.fspath(b) == str(out) and ".tmp-" in os.fspath(a):  # the new output into place
            raise OSError(5, "Input/output error")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError), CheckpointWriter(out, force=True) as wr:
        wr.add("new", torch.ones(2))
        wr.commit("FLOAT")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_CRASH = """
import os, sys, torch
sys.path.insert(0, {root!r})
from quant.checkpoint import CheckpointWriter
out = {out!r}
real = os.rename
def rename(a, b):
    if os.fspath(b) == out:
        os._exit(9)  # killed between moving the old output aside and the new one in
    real(a, b)
os.rename = rename
with CheckpointWriter(out, force=True) as wr:
    wr.add("new", torch.ones(2))
    wr.commit("FLOAT")
"""


def test_crash_between_the_renames_is_repaired_by_the_next_run(tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    before = _earlier_output(out)
    code = textwrap.dedent(_CRASH.format(root=str(ROOT), out=str(out)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=False)
    assert r.returncode == 9, r.stderr.decode()
    assert not out.exists()  # the window: only a later run can repair it
    wr = CheckpointWriter(out, force=True)  # repairs first, then (here) gives up
    wr.abort()
    assert "restored" in caplog.text and "interrupted" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_second_writer_on_the_same_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(out) as wr:
        wr.add("a", torch.ones(2))
        with pytest.raises(FileExistsError, match="being written by another running process"):
            CheckpointWriter(out)
        wr.commit("FLOAT")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_written_files_read_back_with_safetensors_itself(tmp_path: Path) -> None:
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).bfloat16(),
        "b": torch.randint(-9, 9, (7,), generator=g, dtype=torch.int8),
        "c": torch.randint(0, 2**40, (2, 2), generator=g),
        "d": torch.tensor(1.5),
        "e": torch.zeros(0, 4),
        "f": torch.tensor([True, False]),
    }
    with CheckpointWriter(tmp_path / "o") as wr:
        for k, v in tensors.items():
            wr.add(k, v)
        wr.commit("FLOAT")
    with safe_open(tmp_path / "o" / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k


def test_repair_handles_the_earlier_layout_and_touches_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _earlier_output(out)
    legacy = tmp_path / ".out.old-k2_x9abc"  # tempfile.mkdtemp's name, the output inside
    legacy.mkdir()
    out.rename(legacy / "old")
    stale = tmp_path / ".out.tmp-ab12cd34"
    stale.mkdir()
    mine = tmp_path / ".out.old-my-backup"  # not a name this writer gives: left alone
    mine.mkdir()
    CheckpointWriter(out, force=True).abort()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "out"]
