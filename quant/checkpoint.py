"""msmodelslim-style checkpoint directories: read lazily, write atomically.

Layout (what msmodelslim emits and vllm-ascend / MindIE load)::

    out/
      quant_model_description.json   {"model_quant_type": "W8A8", "version": "1.0.0",
                                      "group_size": 0, "<tensor name>": "<quant type>", ...}
      model.safetensors              (one shard), or
      model-00001-of-0000N.safetensors ... + model.safetensors.index.json ({"metadata":
                                      {"total_size": ...}, "weight_map": {name: file}})
      config.json, tokenizer files   (copied from the source model by the converter)

Every tensor of the model has an entry in the description: ``"FLOAT"`` for tensors kept in
float (embeddings, norms, lm_head, ...), the layer's quant type for every tensor of a quantized
layer (``weight``, ``weight_scale``, ``deq_scale``, ...).

Evidence for the conventions (msmodelslim's "quantized weight format" doc and vllm-ascend's
``quantization/methods/w8a8_static.py``, ``w8a16.py``, ``w8a8_dynamic.py``,
``modelslim_config.py``):

- W8A8: ``weight`` int8 [n, k]; ``input_scale`` [1] in the model dtype; ``input_offset`` [1]
  (msmodelslim doc: same dtype as input_scale; vllm-ascend declares int8 and casts - we write the
  model dtype and accept int8); ``deq_scale`` [n] int64 for fp16 models, float32 for bf16 models
  (vllm-ascend ``get_perchannel_param``); ``quant_bias`` int32 [n]; vllm-ascend also creates
  ``weight_scale`` / ``weight_offset`` [n, 1] in the model dtype (newer msmodelslim emits them;
  we write them and treat them as optional). No float ``bias``: it is folded in quant_bias.
  vllm-ascend's ``scale_from_float_to_int64`` stores float32 bits in int64 via numpy
  int32 -> int64 (sign extension; identical to zero extension for the positive scales here).
- W8A16: ``weight``, ``weight_scale``, ``weight_offset``; msmodelslim doc: float32, per-channel
  [n], per-group [n, k / group_size]; vllm-ascend creates [n, 1] in the model dtype and
  passes ``weight_offset`` unchanged to npu_weight_quant_batchmatmul (fine only because its
  offsets are zero); the msmodelslim doc says the NPU op computes ``(w + offset) * scale`` and
  the framework negates the offset at load (our ``quant.convention.to_antiquant_offset``).
- W8A8_DYNAMIC: ``weight``, ``weight_scale`` / ``weight_offset`` [n, 1] model dtype.
- The description's global ``group_size`` is read by vllm-ascend's grouped schemes.

Reading never uses pickle: only ``safetensors.safe_open`` (headers, ``get_slice`` /
``get_tensor``) and, for loaders, ``CheckpointReader.tensor(name)``: a :class:`StoredTensor` that
reads a range of one tensor with positional file reads (``os.preadv``) straight into the
caller's tensor, at offsets taken from the safetensors header (no mmap, no intermediate copy).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant.schemes import Scheme, scheme_from_name

__all__ = [
    "DESCRIPTION_FILE",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "CheckpointReader",
    "CheckpointWriter",
    "StoredTensor",
    "TensorInfo",
    "dtype_from_safetensors",
    "parse_size",
]

DESCRIPTION_FILE = "quant_model_description.json"
INDEX_FILE = "model.safetensors.index.json"
FORMAT_VERSION = "1.0.0"
_RESERVED_KEYS = ("model_quant_type", "version", "group_size", "kv_cache_type", "fa_quant_type")

_ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def dtype_from_safetensors(name: str) -> torch.dtype:
    """torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    try:
        return _ST_DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {name}") from None


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"200MB"``, ``"64KiB"``, ``"1000"`` -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace("IB", "B")
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


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
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


class CheckpointReader:
    """Lazy view of a checkpoint directory (quantized or plain Hugging Face safetensors).

    Lists tensors and their metadata from the safetensors headers only; ``get_slice(name)``
    returns ``safe_open(...).get_slice(name)`` (index it to read part of a tensor);
    ``get_tensor(name)`` reads one whole tensor. Use as a context manager, or call ``close``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.path}")
        desc_path = self.path / DESCRIPTION_FILE
        self.description: dict[str, Any] | None = None
        if desc_path.is_file():
            with open(desc_path, encoding="utf-8") as f:
                self.description = json.load(f)
            if not isinstance(self.description, dict):
                raise ValueError(f"{desc_path}: expected a JSON object")
        self._files = self._find_files()
        self._handles: dict[Path, Any] = {}
        self._fds: dict[Path, int] = {}
        self._infos: dict[str, TensorInfo] = {}
        for file in self._files:
            with safe_open(file, framework="pt") as f:  # validates header, sizes and offsets
                offsets = _data_offsets(file)
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if name in self._infos:
                        raise ValueError(f"tensor {name!r} stored twice ({file.name})")
                    sl = f.get_slice(name)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise ValueError(f"{file.name}: {name}: unsupported dtype {sl.get_dtype()}")
                    info = TensorInfo(
                        name, tuple(sl.get_shape()), dtype, file, offsets.get(name, -1)
                    )
                    if info.offset < 0:
                        raise ValueError(f"{file.name}: {name}: no data offsets in the header")
                    self._infos[name] = info
        index = self.path / INDEX_FILE
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                wmap = json.load(f).get("weight_map", {})
            for name, fname in wmap.items():
                info = self._infos.get(name)
                if info is None or info.file.name != fname:
                    raise ValueError(f"{index.name}: {name!r} is not stored in {fname}")

    def _find_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                wmap = json.load(f).get("weight_map")
            if not isinstance(wmap, dict):
                raise ValueError(f"{index}: missing 'weight_map'")
            files = sorted({self.path / v for v in wmap.values()})
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{index.name} names missing shard(s): {missing}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.path}")
        return files

    # -- listing / metadata --------------------------------------------------------------------

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def names(self) -> list[str]:
        """All tensor names, in file order then header order."""
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.path}") from None

    def infos_by_file(self) -> Iterator[tuple[Path, list[TensorInfo]]]:
        """(file, its tensors) per shard, for streaming one shard at a time."""
        for file in self._files:
            yield file, [i for i in self._infos.values() if i.file == file]

    @property
    def model_quant_type(self) -> str:
        return str((self.description or {}).get("model_quant_type", "FLOAT"))

    @property
    def group_size(self) -> int:
        return int((self.description or {}).get("group_size", 0) or 0)

    @property
    def version(self) -> str | None:
        v = (self.description or {}).get("version")
        return None if v is None else str(v)

    def quant_type(self, name: str) -> str:
        """Description entry of a tensor (``"FLOAT"`` for a plain float checkpoint)."""
        if self.description is None:
            return "FLOAT"
        return str(self.description.get(name, "FLOAT"))

    def layer_scheme(self, module: str) -> Scheme:
        """Scheme of a linear layer from the description entry of ``module + ".weight"``."""
        return scheme_from_name(self.quant_type(f"{module}.weight"), self.group_size)

    def validate_layer(self, module: str) -> Scheme:
        """Check a layer's stored tensors against its scheme's ``tensor_specs``; return the
        scheme. Raises ValueError naming the tensor on any mismatch or missing tensor."""
        scheme = self.layer_scheme(module)
        w = self.info(f"{module}.weight")
        if len(w.shape) != 2:
            raise ValueError(f"{module}.weight: expected 2-D, got {list(w.shape)}")
        n, k = w.shape
        has_bias = f"{module}.bias" in self
        model_dtype = self._model_dtype(module, scheme)
        for spec in scheme.tensor_specs(n, k, has_bias, model_dtype):
            full = f"{module}.{spec.name}"
            if full not in self:
                if spec.required:
                    raise ValueError(f"{full}: missing from checkpoint ({scheme.name} layer)")
                continue
            info = self.info(full)
            spec.check(info.shape, info.dtype, where=module)
        return scheme

    def _model_dtype(self, module: str, scheme: Scheme) -> torch.dtype:
        for suffix in ("weight", "input_scale", "weight_scale", "bias"):
            name = f"{module}.{suffix}"
            if name in self and self.info(name).dtype in (
                torch.float16,
                torch.bfloat16,
                torch.float32,
            ):
                return self.info(name).dtype
        if f"{module}.deq_scale" in self:
            return (
                torch.float16
                if self.info(f"{module}.deq_scale").dtype == torch.int64
                else torch.bfloat16
            )
        return torch.bfloat16

    # -- data ----------------------------------------------------------------------------------

    def _handle(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is None:
            h = safe_open(file, framework="pt")
            self._handles[file] = h
        return h

    def get_slice(self, name: str) -> Any:
        """``safe_open(file).get_slice(name)``: index it (``sl[a:b]``, ``sl[:, c:d]``) to read
        only that part; ``sl.get_shape()`` / ``sl.get_dtype()`` give metadata."""
        return self._handle(self.info(name).file).get_slice(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        """One whole tensor."""
        return self._handle(self.info(name).file).get_tensor(name)

    def tensor(self, name: str, on_read: Callable[[int], None] | None = None) -> StoredTensor:
        """A :class:`StoredTensor`: reads ranges of ``name`` with positional reads straight
        into caller memory. ``on_read(nbytes)`` is called after every read with the bytes
        delivered."""
        return StoredTensor(self.info(name), self, on_read)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fds[file] = fd
        return fd

    def close(self) -> None:
        self._handles.clear()
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _data_offsets(file: Path) -> dict[str, int]:
    """Absolute byte offset of every tensor's data in a safetensors file, from its header
    (8-byte little-endian header length, then JSON ``{name: {"data_offsets": [begin, end]}}``,
    offsets relative to the end of the header)."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{file.name}: incomplete safetensors header")
        n = int.from_bytes(head, "little")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"{file.name}: the safetensors header is not a JSON object")
    return {
        k: 8 + n + int(v["data_offsets"][0])
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    }


_SCRATCH_BYTES = 8 << 20  # bound of the temporary buffer of a converting read
_IOV_MAX = 1024  # Linux's UIO_MAXIOV: buffers per preadv call


class StoredTensor:
    """One tensor of a safetensors file, read with positional file reads (``os.preadv``) into
    the caller's memory: ``read(dim, start, length, out)`` delivers ``t[..., start:start+length,
    ...]`` (along ``dim``; everything when ``dim`` is None). Byte ranges come from the header:
    a block of leading rows is one contiguous read; a block of columns (a slice of every row)
    is one read per row of ``out``'s memory, or, where the skipped part of a row is at most
    the part kept, batched ``preadv`` calls that land the rows in ``out`` and the skipped
    bytes in a small reused buffer. A read into a tensor of another dtype (or device, or a
    non-contiguous one) goes through a bounded scratch buffer. No mmap: nothing of the file
    stays in this process's RSS.

    Also usable like a safetensors slice: ``get_shape()``, ``get_dtype()``, ``t[a:b]``,
    ``t[:, c:d]``.
    """

    def __init__(
        self,
        info: TensorInfo,
        reader: CheckpointReader,
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        self.info = info
        self.name = info.name
        self.shape = tuple(info.shape)
        self.dtype = info.dtype
        self._reader = reader
        self._on_read = on_read

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return _ST_NAMES[self.dtype]

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

    def read(
        self,
        dim: int | None = None,
        start: int = 0,
        length: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``t[..., start:start+length, ...]`` along ``dim`` (all of ``t`` if dim is None)
        into ``out`` (any dtype / device, same number of elements; cast on the way) or a new
        CPU tensor of the stored dtype. Returns the tensor written. ValueError naming the
        file on a short read (truncated file)."""
        shape = self.shape
        isz = self.dtype.itemsize
        if dim is None:
            rng_shape, outer = shape, 1
            chunk = _numel(shape) * isz
            stride, first = chunk, self.info.offset
        else:
            if not 0 <= dim < len(shape):
                raise ValueError(f"{self.name}: dim {dim} out of range for shape {list(shape)}")
            length = shape[dim] - start if length is None else length
            if start < 0 or length < 0 or start + length > shape[dim]:
                raise ValueError(
                    f"{self.name}: range [{start}, {start + length}) out of bounds for dim {dim} "
                    f"of shape {list(shape)}"
                )
            rng_shape = (*shape[:dim], length, *shape[dim + 1 :])
            outer = _numel(shape[:dim])
            inner = _numel(shape[dim + 1 :]) * isz
            chunk, stride = length * inner, shape[dim] * inner
            first = self.info.offset + start * inner
        if out is None:
            out = torch.empty(rng_shape, dtype=self.dtype)
        elif out.numel() != _numel(rng_shape):
            raise ValueError(
                f"{self.name}: a range of shape {list(rng_shape)} does not fit a destination of "
                f"shape {list(out.shape)}"
            )
        if chunk and outer:
            if out.device.type == "cpu" and out.is_contiguous():
                if out.dtype == self.dtype:
                    self._read_rows(_byte_view(out), 0, outer, first, chunk, stride, 0, chunk)
                else:
                    self._read_cast(out, outer, first, chunk, stride)
            else:
                tmp = torch.empty(out.shape, dtype=out.dtype)
                self._read_cast(tmp, outer, first, chunk, stride)
                out.copy_(tmp)
        if self._on_read is not None:
            self._on_read(outer * chunk)
        return out

    def _read_cast(
        self, out: torch.Tensor, outer: int, first: int, chunk: int, stride: int
    ) -> None:
        """Read into a contiguous CPU ``out`` of another dtype through <= _SCRATCH_BYTES blocks."""
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
        fd = self._reader._fd(self.info.file)
        n = o1 - o0
        base = first + o0 * stride + c0
        if n == 1 or cb == stride:  # one contiguous range
            self._pread(fd, buf[: n * cb], base)
            return
        gap = stride - cb
        if gap <= cb:  # skipped bytes <= kept ones: batch rows + gaps per preadv
            junk = memoryview(bytearray(gap))
            per_call = (_IOV_MAX + 1) // 2
            for r0 in range(0, n, per_call):
                r1 = min(n, r0 + per_call)
                iov: list[memoryview] = []
                for r in range(r0, r1):
                    iov.append(buf[r * cb : (r + 1) * cb])
                    iov.append(junk)
                iov.pop()
                want = (r1 - r0) * cb + (r1 - r0 - 1) * gap
                if os.preadv(fd, iov, base + r0 * stride) != want:  # short: retry row by row
                    for r in range(r0, r1):
                        self._pread(fd, buf[r * cb : (r + 1) * cb], base + r * stride)
            return
        for r in range(n):
            self._pread(fd, buf[r * cb : (r + 1) * cb], base + r * stride)

    def _pread(self, fd: int, buf: memoryview, offset: int) -> None:
        while len(buf):
            got = os.preadv(fd, [buf], offset)
            if got <= 0:
                raise ValueError(
                    f"{self.info.file.name}: {self.name}: unexpected end of file at byte "
                    f"{offset} (truncated file?)"
                )
            buf, offset = buf[got:], offset + got


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _byte_view(t: torch.Tensor) -> memoryview:
    """Writable memoryview of the bytes of a contiguous CPU tensor (any dtype, bf16 included)."""
    flat = t.as_strided((t.numel(),), (1,))  # contiguous: size-1 dims may have any stride
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class CheckpointWriter:
    """Atomic, incremental writer of a checkpoint directory.

    Tensors are ``add``-ed one at a time and flushed to a shard file once the buffered bytes
    would exceed ``max_shard_bytes`` (peak memory: one shard plus one tensor). Everything is
    written into a temporary directory beside ``out_dir``; ``commit`` renames it into place.
    On an exception inside ``with`` (or ``abort``) the temporary directory is removed and
    ``out_dir`` is untouched. An existing ``out_dir`` is refused unless ``force=True``, in which
    case it is replaced only at commit.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_shard_bytes: int | str = "2GB",
        force: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.force = force
        self.max_shard_bytes = parse_size(max_shard_bytes)
        if self.max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes: must be positive")
        if self.out_dir.exists() and not force:
            raise FileExistsError(
                f"output {self.out_dir} already exists; pass force=True (--force) to replace it"
            )
        parent = self.out_dir.resolve().parent
        if not parent.is_dir():
            raise FileNotFoundError(f"parent directory of the output does not exist: {parent}")
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=parent))
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._quant_types: dict[str, str] = {}
        self._total = 0
        self._done = False

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
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    @property
    def num_shards(self) -> int:
        """Shards written so far."""
        return len(self._shards)

    def copy_file(self, src: str | os.PathLike[str], name: str | None = None) -> None:
        """Copy a side file (config.json, tokenizer, ...) into the output."""
        shutil.copy2(src, self.tmp_dir / (name or Path(src).name))

    def commit(
        self,
        model_quant_type: str,
        *,
        group_size: int = 0,
        version: str = FORMAT_VERSION,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the last shard, the index (if sharded) and the description, then move the
        directory into place. Returns the output path."""
        self.flush()
        try:
            n = len(self._shards)
            weight_map: dict[str, str] = {}
            for i, (path, names) in enumerate(self._shards):
                final = (
                    "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                )
                path.rename(self.tmp_dir / final)
                weight_map.update(dict.fromkeys(names, final))
            if n > 1:
                index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
                _write_json(self.tmp_dir / INDEX_FILE, index)
            desc: dict[str, Any] = {
                "model_quant_type": model_quant_type,
                "version": version,
                "group_size": int(group_size),
            }
            if extra:
                desc.update(extra)
            desc.update(self._quant_types)
            _write_json(self.tmp_dir / DESCRIPTION_FILE, desc)
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out_dir

    def _move_into_place(self) -> None:
        trash: Path | None = None
        if self.out_dir.exists():
            if not self.force:
                raise FileExistsError(f"output {self.out_dir} appeared while writing")
            trash = Path(
                tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.tmp_dir.parent)
            )
            os.rename(self.out_dir, trash / "old")
        os.rename(self.tmp_dir, self.out_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far."""
        self._done = True
        self._buffer = {}
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

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


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
