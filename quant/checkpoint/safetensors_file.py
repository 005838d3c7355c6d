"""One safetensors file, read through ONE open file descriptor from header to last byte.

The header (8-byte little-endian length, then JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}}``, offsets relative to the end of the header) is parsed and checked from the same
descriptor the data is later read through, with the same rules as safetensors' own reader
(huggingface/safetensors ``safetensors/src/tensor.rs``: header at most 100 MB, every tensor's
byte span matching its shape and dtype, spans covering the data without gaps or overlaps up to
the end of the file). After every read the file is checked to still be the one opened (device,
inode, size, mtime of the descriptor and of the path): a shard replaced by an atomic rename
(rsync, a re-run of the converter) or rewritten in place raises :class:`FileChangedError` instead
of handing out bytes at the old offsets.

Data is read with positional reads (``os.preadv``) straight into the caller's tensor: no mmap,
no pickle, nothing of the file left in this process's RSS.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quant.checkpoint.format import (
    ST_DTYPES,
    ST_NAMES,
    CheckpointFileError,
    FileChangedError,
)

__all__ = ["SafetensorsFile", "StoredTensor", "TensorInfo"]

_MAX_HEADER = 100_000_000  # safetensors/src/tensor.rs MAX_HEADER_SIZE
_SCRATCH_BYTES = 8 << 20  # bound of the temporary buffer of a converting read
_IOV_MAX = 1024  # Linux's UIO_MAXIOV: buffers per preadv call


@dataclass(frozen=True)
class TensorInfo:
    """Metadata of one stored tensor (no data read). ``offset``: absolute byte offset of its
    data in ``file`` (from the safetensors header; -1 if unknown)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = -1

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SafetensorsFile:
    """An open safetensors file: ``tensors`` (name -> :class:`TensorInfo`, in name order) from its
    checked header; ``tensor(name)`` reads data through the same descriptor. Raises
    :class:`CheckpointFileError` naming the file (and tensor) for an empty, truncated or corrupt
    file. ``close()`` when done."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointFileError(self.path, "not a regular file")
            self._identity = _identity(st)
            self.tensors = self._read_header(st.st_size)
        except BaseException:
            self.close()
            raise

    def _error(self, what: str, tensor: str | None = None) -> CheckpointFileError:
        return CheckpointFileError(self.path, what, tensor)

    def _read_header(self, size: int) -> dict[str, TensorInfo]:
        if size == 0:
            raise self._error("empty file (0 bytes), not a safetensors file")
        if size < 8:
            raise self._error(f"truncated: {size} bytes, less than the 8-byte header length")
        n = int.from_bytes(self.pread(8, 0), "little")
        if n > _MAX_HEADER:
            raise self._error(
                f"header length {n} exceeds safetensors' limit of {_MAX_HEADER} bytes "
                "(corrupt file, or not a safetensors file)"
            )
        if 8 + n > size:
            raise self._error(
                f"header length {n} exceeds the file size ({size} bytes): truncated or corrupt"
            )
        try:
            header = json.loads(self.pread(n, 8), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:
            raise self._error(f"corrupt header: not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._error("corrupt header: not a JSON object")
        return self._entries(header, 8 + n, size)

    def _entries(self, header: dict[str, Any], start: int, size: int) -> dict[str, TensorInfo]:
        """Check every entry and that the data spans tile [start, size) exactly."""
        if not isinstance(header.pop("__metadata__", {}), dict):
            raise self._error("corrupt header: '__metadata__' is not a JSON object")
        infos: dict[str, TensorInfo] = {}
        spans: list[tuple[int, int, str]] = []
        for name in sorted(header):
            info, span = self._entry(name, header[name], start)
            infos[name] = info
            spans.append((*span, name))
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                how = "overlap the previous tensor" if begin < pos else "leave a gap before it"
                raise self._error(f"corrupt header: data_offsets [{begin}, {end}] {how}", name)
            pos = end
        cut = next((s for s in spans if start + s[1] > size), None)
        if cut is not None:
            raise self._error(
                f"truncated: the file has {size} bytes, its header describes {start + pos}; "
                f"this tensor's data ends at byte {start + cut[1]}",
                cut[2],
            )
        if start + pos != size:
            raise self._error(
                f"corrupt file: {size - start - pos} bytes after the last tensor's data"
            )
        return infos

    def _entry(self, name: str, entry: Any, start: int) -> tuple[TensorInfo, tuple[int, int]]:
        if not isinstance(entry, dict):
            raise self._error("corrupt header: the entry is not a JSON object", name)
        dtype = ST_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise self._error(f"unsupported dtype {entry.get('dtype')!r}", name)
        shape, offs = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
            raise self._error(f"corrupt header: shape {shape!r} is not a list of counts", name)
        if not (isinstance(offs, list) and len(offs) == 2 and all(map(_is_count, offs))) or (
            offs[0] > offs[1]
        ):
            raise self._error(f"corrupt header: data_offsets {offs!r} is not [begin, end]", name)
        nbytes = _numel(tuple(shape)) * dtype.itemsize
        if offs[1] - offs[0] != nbytes:
            raise self._error(
                f"corrupt header: data_offsets {offs} span {offs[1] - offs[0]} bytes, "
                f"shape {shape} of {dtype} needs {nbytes}",
                name,
            )
        return TensorInfo(name, tuple(shape), dtype, self.path, start + offs[0]), (offs[0], offs[1])

    def check_unchanged(self, tensor: str | None = None) -> None:
        """Raise :class:`FileChangedError` unless the descriptor and the path still refer to the
        file as it was when its header was read (same device, inode, size and mtime)."""
        if _identity(os.fstat(self.fd)) != self._identity:
            raise FileChangedError(
                self.path,
                "modified while being read (size or mtime changed since its header was read); "
                "load again once the file is complete",
                tensor,
            )
        try:
            now = _identity(os.stat(self.path))
        except FileNotFoundError:
            now = None
        if now != self._identity:
            raise FileChangedError(
                self.path,
                "replaced or removed while being read (the path no longer names the file whose "
                "header was read); load again once the checkpoint is complete",
                tensor,
            )

    def pread_into(self, buf: memoryview, offset: int, tensor: str | None = None) -> None:
        """Fill ``buf`` from file offset ``offset`` (a short read is a named error)."""
        while len(buf):
            got = os.preadv(self.fd, [buf], offset)
            if got <= 0:
                self.check_unchanged(tensor)
                raise self._error(f"unexpected end of file at byte {offset}", tensor)
            buf, offset = buf[got:], offset + got

    def pread(self, n: int, offset: int) -> bytes:
        buf = bytearray(n)
        self.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def tensor(self, name: str, on_read: Callable[[int], None] | None = None) -> StoredTensor:
        return StoredTensor(self.tensors[name], self, on_read)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"tensor {k!r} appears twice")
        out[k] = v
    return out


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class StoredTensor:
    """One tensor of a :class:`SafetensorsFile`, read with positional file reads (``os.preadv``)
    into the caller's memory: ``read(dim, start, length, out)`` delivers ``t[..., start:start+
    length, ...]`` (along ``dim``; everything when ``dim`` is None). A block of leading rows is
    one contiguous read; a block of columns is one read per row, or, where the skipped part of a
    row is at most the part kept, batched ``preadv`` calls that land the rows in ``out`` and the
    skipped bytes in a small reused buffer. A read into a tensor of another dtype (or device, or
    a non-contiguous one) goes through a bounded scratch buffer.

    Also usable like a safetensors slice: ``get_shape()``, ``get_dtype()``, ``t[a:b]``,
    ``t[:, c:d]``.
    """

    def __init__(
        self,
        info: TensorInfo,
        file: SafetensorsFile,
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        self.info = info
        self.name = info.name
        self.shape = tuple(info.shape)
        self.dtype = info.dtype
        self._file = file
        self._on_read = on_read

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return ST_NAMES[self.dtype]

    def __getitem__(self, idx: Any) -> torch.Tensor:
        idx = idx if isinstance(idx, tuple) else (idx,)
        cut = []
        for d, ix in enumerate(idx):
            if not isinstance(ix, slice) or d >= len(self.shape):
                return self.read()[idx]
            start, stop, step = ix.indices(self.shape[d])
            if step != 1:
                return self.read()[idx]
            if (start, stop) != (0, self.shape[d]):
                cut.append((d, start, max(stop - start, 0)))
        if not cut:
            return self.read()
        d, start, length = cut[0]
        t = self.read(d, start, length)
        return t[(*idx[:d], slice(None), *idx[d + 1 :])] if len(cut) > 1 else t

    def _geometry(
        self, dim: int | None, start: int, length: int | None
    ) -> tuple[tuple[int, ...], int, int, int, int]:
        """(range shape, row pieces, file offset of the first, bytes per piece, stride)."""
        shape, isz = self.shape, self.dtype.itemsize
        if dim is None:
            chunk = _numel(shape) * isz
            return shape, 1, self.info.offset, chunk, chunk
        if not 0 <= dim < len(shape):
            raise ValueError(f"{self.name}: dim {dim} out of range for shape {list(shape)}")
        length = shape[dim] - start if length is None else length
        if start < 0 or length < 0 or start + length > shape[dim]:
            raise ValueError(
                f"{self.name}: range [{start}, {start + length}) out of bounds for dim {dim} "
                f"of shape {list(shape)}"
            )
        inner = _numel(shape[dim + 1 :]) * isz
        rng_shape = (*shape[:dim], length, *shape[dim + 1 :])
        first = self.info.offset + start * inner
        return rng_shape, _numel(shape[:dim]), first, length * inner, shape[dim] * inner

    def read(
        self,
        dim: int | None = None,
        start: int = 0,
        length: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``t[..., start:start+length, ...]`` along ``dim`` (all of ``t`` if dim is None)
        into ``out`` (any dtype / device, same number of elements; cast on the way) or a new
        CPU tensor of the stored dtype. Returns the tensor written. Raises
        :class:`CheckpointFileError` naming file and tensor on a short read, and
        :class:`FileChangedError` if the file changed since its header was read."""
        rng_shape, outer, first, chunk, stride = self._geometry(dim, start, length)
        if out is None:
            out = torch.empty(rng_shape, dtype=self.dtype)
        elif out.numel() != _numel(rng_shape):
            raise ValueError(
                f"{self.name}: a range of shape {list(rng_shape)} does not fit a destination of "
                f"shape {list(out.shape)}"
            )
        if chunk and outer:
            if out.device.type == "cpu" and out.is_contiguous():
                self._read_cast(out, outer, first, chunk, stride)
            else:
                tmp = torch.empty(out.shape, dtype=out.dtype)
                self._read_cast(tmp, outer, first, chunk, stride)
                out.copy_(tmp)
        self._file.check_unchanged(self.name)
        if self._on_read is not None:
            self._on_read(outer * chunk)
        return out

    def _read_cast(
        self, out: torch.Tensor, outer: int, first: int, chunk: int, stride: int
    ) -> None:
        """Read into a contiguous CPU ``out``; another dtype goes through <= _SCRATCH_BYTES
        blocks of the stored dtype."""
        isz = self.dtype.itemsize
        flat = out.view(-1)
        per_row = chunk // isz
        if out.dtype == self.dtype:
            self._read_rows(_byte_view(out), 0, outer, first, chunk, stride, 0, chunk)
        elif chunk <= _SCRATCH_BYTES:
            rows = max(1, _SCRATCH_BYTES // chunk)
            for o0 in range(0, outer, rows):
                o1 = min(outer, o0 + rows)
                tmp = torch.empty((o1 - o0) * per_row, dtype=self.dtype)
                self._read_rows(_byte_view(tmp), o0, o1, first, chunk, stride, 0, chunk)
                flat[o0 * per_row : o1 * per_row].copy_(tmp)
        else:
            step = _SCRATCH_BYTES - _SCRATCH_BYTES % isz
            tmp = torch.empty(step // isz, dtype=self.dtype)
            for o in range(outer):
                for c0 in range(0, chunk, step):
                    cb = min(step, chunk - c0)
                    part = tmp[: cb // isz]
                    self._read_rows(_byte_view(part), o, o + 1, first, chunk, stride, c0, cb)
                    e0 = o * per_row + c0 // isz
                    flat[e0 : e0 + cb // isz].copy_(part)

    def _read_rows(
        self,
        buf: memoryview,
        o0: int,
        o1: int,
        first: int,
        chunk: int,
        stride: int,
        c0: int,
        cb: int,
    ) -> None:
        """Bytes [c0, c0+cb) of the ``chunk``-byte row pieces o0..o1 (``stride`` apart, the
        first at file offset ``first``), packed into ``buf``."""
        f, n = self._file, o1 - o0
        base = first + o0 * stride + c0
        if n == 1 or cb == stride:  # one contiguous range
            f.pread_into(buf[: n * cb], base, self.name)
            return
        gap = stride - cb
        if gap > cb:  # skipped bytes > kept ones: one read per row
            for r in range(n):
                f.pread_into(buf[r * cb : (r + 1) * cb], base + r * stride, self.name)
            return
        junk = memoryview(bytearray(gap))  # batch rows + gaps per preadv
        per_call = (_IOV_MAX + 1) // 2
        for r0 in range(0, n, per_call):
            r1 = min(n, r0 + per_call)
            iov: list[memoryview] = []
            for r in range(r0, r1):
                iov += [buf[r * cb : (r + 1) * cb], junk]
            iov.pop()
            want = (r1 - r0) * cb + (r1 - r0 - 1) * gap
            if os.preadv(f.fd, iov, base + r0 * stride) != want:  # short: retry row by row
                for r in range(r0, r1):
                    f.pread_into(buf[r * cb : (r + 1) * cb], base + r * stride, self.name)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _byte_view(t: torch.Tensor) -> memoryview:
    """Writable memoryview of the bytes of a contiguous CPU tensor (any dtype, bf16 included)."""
    flat = t.as_strided((t.numel(),), (1,))  # contiguous: size-1 dims may have any stride
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
