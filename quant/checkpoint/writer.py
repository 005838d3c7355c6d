"""``CheckpointWriter``: write a checkpoint directory so that the output appears complete or not
at all, and nothing the run did not create is ever deleted.

- Everything goes into a hidden temporary directory beside the output (``.<out>.tmp-<pid>-<hex>``,
  created with the caller's umask), every file and the directory are fsync'ed, then one rename
  puts it in place and the parent directory is fsync'ed (the commit survives a power loss).
- ``force`` replaces only an earlier output (a directory holding ``quant_model_description.json``)
  or an empty directory, never a file, a symlink or any other directory; the old output is
  renamed aside (``.<out>.old-...``), the new one renamed into place, then the old one deleted.
- One run per output at a time: an exclusive ``flock`` on ``.<out>.lock`` (released by the kernel
  when a process dies). Holding it, a new writer repairs what a killed run left behind: the old
  output renamed aside but its replacement not yet in place is renamed back; leftover temporary
  and aside directories are deleted (each logged as a warning).
- ``check_output_path(src, out)`` refuses an output that is, is inside, or contains the source
  directory (after resolving symlinks), with or without ``force``.
- Every OS error while writing (a full disk, permissions) is a :class:`CheckpointWriteError`
  naming the file; the temporary directory is then removed and the output left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from quant.checkpoint.format import (
    DESCRIPTION_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    ST_NAMES,
    parse_size,
)

__all__ = ["CheckpointWriteError", "CheckpointWriter", "check_output_path"]

logger = logging.getLogger(__name__)

_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointWriteError(OSError):
    """Writing the output failed (``errno`` kept); the output directory was not changed."""


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OS error inside the block into a :class:`CheckpointWriteError` naming the file."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except OSError as e:
        hint = " (disk full or over quota?)" if e.errno in _FULL else ""
        err = CheckpointWriteError(f"cannot write {e.filename or path}: {e.strerror or e}{hint}")
        err.errno = e.errno
        raise err from e


def _write_all(f: Any, data: memoryview | bytes) -> None:
    f.write(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a safetensors file (the format of huggingface/safetensors ``serialize``: tensors
    ordered by item size, largest first, then name, so every tensor starts aligned to its item
    size; header padded with spaces to a multiple of 8) and fsync it."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + nbytes],
        }
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "xb") as f:
        _write_all(f, len(text).to_bytes(8, "little") + text)
        for name in order:
            t = tensors[name].reshape(-1)
            if t.numel():
                _write_all(f, memoryview(t.view(torch.uint8).numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "x", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# -- where the output may go -------------------------------------------------------------------


def _output_path(out: str | os.PathLike[str]) -> Path:
    """``out`` with its parent resolved (``out`` itself may not exist or be a symlink)."""
    p = Path(out)
    if p.name in ("", ".", ".."):
        raise ValueError(f"output {str(out)!r}: must name a directory, not '.' or '..'")
    return p.parent.resolve() / p.name


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _overlap(src: Path, out: Path) -> str | None:
    """How ``out`` overlaps the (resolved) source directory, or None."""
    real = out.resolve()
    if real == src or _samefile(real, src):
        return "is"
    if real.is_relative_to(src) or any(_samefile(p, src) for p in real.parents):
        return "is inside"
    if src.is_relative_to(real) or any(_samefile(p, real) for p in src.parents):
        return "contains"
    return None


def _check_replaceable(out: Path) -> None:
    """``out`` exists: may ``force`` replace it? Only an earlier output or an empty dir."""
    if out.is_symlink():
        raise FileExistsError(
            f"output {out} is a symbolic link (to {os.readlink(out)}); --force does not replace "
            "links: give the directory itself or another --out"
        )
    if not out.is_dir():
        raise FileExistsError(
            f"output {out} exists and is not a directory; --force does not replace it"
        )
    if not (out / DESCRIPTION_FILE).is_file() and any(out.iterdir()):
        raise FileExistsError(
            f"output {out} exists and is not a quantized checkpoint (no {DESCRIPTION_FILE}); "
            "--force replaces only an earlier output or an empty directory: remove it yourself "
            "or choose another --out"
        )


def check_output_path(
    src: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool
) -> None:
    """Refuse an output directory that would touch the source ``src`` (same directory, inside
    it, or containing it, after resolving symlinks; with or without ``force``), an existing one
    without ``force``, and one ``force`` may not replace (see :class:`CheckpointWriter`)."""
    src_real = Path(src).resolve()
    out_path = _output_path(out)
    relation = _overlap(src_real, out_path)
    if relation is not None:
        linked = out_path.resolve() != Path(os.path.abspath(out)) or src_real != Path(
            os.path.abspath(src)
        )
        raise ValueError(
            f"output {out} {relation} the model directory {src}"
            + (" (after resolving symbolic links)" if linked else "")
            + ": refused with or without --force; choose an output outside the model"
        )
    if os.path.lexists(out_path):
        if not force:
            raise FileExistsError(f"output {out} already exists; use --force to replace it")
        _check_replaceable(out_path)


# -- one run per output; repairing what a killed run left ------------------------------------


class _OutputLock:
    """Exclusive ``flock`` on ``.<out>.lock`` beside the output."""

    def __init__(self, out: Path) -> None:
        self.path = out.parent / f".{out.name}.lock"
        while True:
            with _writing(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FileExistsError(
                    f"output {out} is being written by another running process "
                    f"(it holds {self.path})"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)  # the file was removed and re-created meanwhile: lock the new one
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(fd)


def _hidden(out: Path, kind: str) -> list[Path]:
    """Directories beside ``out`` named as this writer names its temporary (``tmp``) and
    set-aside (``old``) directories (``-<pid>-<8 hex>``; ``tempfile.mkdtemp``'s 8-character
    suffix for those of earlier versions)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{kind}-(\d+-[0-9a-f]{{8}}|[a-z0-9_]{{8}})")
    return sorted(
        p
        for p in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    )


def _repair(out: Path) -> None:
    """Holding the lock: undo or finish what an interrupted run left beside ``out``."""
    asides = _hidden(out, "old")
    if asides and not os.path.lexists(out):
        newest = max(asides, key=lambda p: p.lstat().st_ctime_ns)
        legacy = newest / "old"  # earlier versions moved the old output to <aside>/old
        if legacy.is_dir():
            os.rename(legacy, out)  # the empty <aside> is removed below
        else:
            os.rename(newest, out)
            asides.remove(newest)
        logger.warning(
            "restored %s from %s: a --force run was interrupted between moving the old output "
            "aside and putting its replacement in place",
            out,
            newest.name,
        )
    for p in asides + _hidden(out, "tmp"):
        shutil.rmtree(p, ignore_errors=True)
        logger.warning("removed %s, left behind by an interrupted run", p)


class CheckpointWriter:
    """Atomic, incremental writer of a checkpoint directory (see the module docstring).

    Tensors are ``add``-ed one at a time and flushed to a shard file once the buffered bytes
    would exceed ``max_shard_bytes`` (peak memory: one shard plus one tensor). ``commit`` moves
    the result into place. On an exception inside ``with`` (or ``abort``) the temporary
    directory is removed and ``out_dir`` is untouched. An existing ``out_dir`` is refused unless
    ``force=True`` (and it is an earlier output or empty), in which case it is replaced only at
    commit.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_shard_bytes: int | str = "2GB",
        force: bool = False,
    ) -> None:
        self.max_shard_bytes = parse_size(max_shard_bytes)
        if self.max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes: must be positive")
        self.out_dir = _output_path(out_dir)
        self.force = force
        if not self.out_dir.parent.is_dir():
            raise FileNotFoundError(
                f"parent directory of the output does not exist: {self.out_dir.parent}"
            )
        self._lock = _OutputLock(self.out_dir)
        try:
            with _writing(self.out_dir.parent):
                _repair(self.out_dir)
            if os.path.lexists(self.out_dir):
                if not force:
                    raise FileExistsError(
                        f"output {self.out_dir} already exists; pass force=True (--force) to "
                        "replace it"
                    )
                _check_replaceable(self.out_dir)
            self.tmp_dir = self._hidden_path("tmp")
            with _writing(self.tmp_dir):
                os.mkdir(self.tmp_dir, 0o777)  # the umask applies (mkdtemp would give 0700)
        except BaseException:
            self._lock.release()
            raise
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._quant_types: dict[str, str] = {}
        self._total = 0
        self._done = False

    def _hidden_path(self, kind: str) -> Path:
        name = f".{self.out_dir.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        return self.out_dir.parent / name

    def add(self, name: str, tensor: torch.Tensor, quant_type: str = "FLOAT") -> None:
        """Queue one tensor (written contiguous, on CPU) with its description entry."""
        if self._done:
            raise RuntimeError("writer already committed or aborted")
        if name in self._quant_types:
            raise ValueError(f"tensor {name!r} added twice")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = t
        self._buffer_bytes += nbytes
        self._quant_types[name] = quant_type
        self._total += nbytes

    def flush(self) -> None:
        """Write the buffered tensors as the next shard."""
        if not self._buffer:
            return
        path = self.tmp_dir / f"shard-{len(self._shards):05d}.safetensors"
        with _writing(path):
            _write_safetensors(path, self._buffer)
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    @property
    def num_shards(self) -> int:
        """Shards written so far."""
        return len(self._shards)

    def copy_file(self, src: str | os.PathLike[str], name: str | None = None) -> None:
        """Copy a side file (config.json, tokenizer, ...) into the output (fsync'ed)."""
        dst = self.tmp_dir / (name or Path(src).name)
        with _writing(dst):
            shutil.copy2(src, dst)
            with open(dst, "rb") as f:
                os.fsync(f.fileno())

    def copy_side_files(self, src: str | os.PathLike[str]) -> list[str]:
        """Copy every regular file of model directory ``src`` that is not a weight file, index
        or description (config, tokenizer, README, ...). A symlink is followed only while its
        target stays inside ``src`` (or, for a Hugging Face cache snapshot
        ``.../snapshots/<rev>``, inside that repository's ``blobs/``, where huggingface_hub's
        ``file_download.py`` points them); others are skipped with a warning. Returns the names
        copied."""
        root = Path(src).resolve()
        allowed = [root]
        if root.parent.name == "snapshots":
            allowed.append(root.parent.parent / "blobs")
        copied = []
        for entry in sorted(Path(src).iterdir()):
            name = entry.name
            if name in (INDEX_FILE, DESCRIPTION_FILE) or name.endswith(_WEIGHT_FILE_SUFFIXES):
                continue
            target = entry.resolve()
            if not any(target.is_relative_to(a) for a in allowed):
                logger.warning(
                    "not copying %s: a symbolic link to %s, outside the model directory",
                    entry,
                    target,
                )
                continue
            if target.is_file():
                self.copy_file(target, name)
                copied.append(name)
        return copied

    def commit(
        self,
        model_quant_type: str,
        *,
        group_size: int = 0,
        version: str = FORMAT_VERSION,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the last shard, the index (if sharded) and the description, fsync, then move
        the directory into place. Returns the output path."""
        try:
            self.flush()
            with _writing(self.tmp_dir):
                self._write_metadata(model_quant_type, group_size, version, extra)
                _fsync_dir(self.tmp_dir)
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._lock.release()
        return self.out_dir

    def _write_metadata(
        self, quant_type: str, group_size: int, version: str, extra: Mapping[str, Any] | None
    ) -> None:
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.tmp_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
            _write_json(self.tmp_dir / INDEX_FILE, index)
        desc: dict[str, Any] = {
            "model_quant_type": quant_type,
            "version": version,
            "group_size": int(group_size),
        }
        desc.update(extra or {})
        desc.update(self._quant_types)
        _write_json(self.tmp_dir / DESCRIPTION_FILE, desc)

    def _move_into_place(self) -> None:
        out, aside = self.out_dir, None
        if os.path.lexists(out):
            if not self.force:
                raise FileExistsError(f"output {out} appeared while writing")
            _check_replaceable(out)
            aside = self._hidden_path("old")
            with _writing(out):
                os.rename(out, aside)
        try:
            with _writing(out):
                os.rename(self.tmp_dir, out)
        except BaseException:
            if aside is not None:
                os.rename(aside, out)
            raise
        with _writing(out.parent):
            _fsync_dir(out.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far."""
        self._done = True
        self._buffer = {}
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._lock.release()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None or not self._done:
            self.abort()
