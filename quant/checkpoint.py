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

Reading never uses pickle: only ``safetensors.safe_open``; ``get_slice`` lets loaders read a
row/column slice of one tensor without loading the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
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
    "TensorInfo",
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
    """Metadata of one stored tensor (no data read)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

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
        self._infos: dict[str, TensorInfo] = {}
        for file in self._files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if name in self._infos:
                        raise ValueError(f"tensor {name!r} stored twice ({file.name})")
                    sl = f.get_slice(name)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise ValueError(f"{file.name}: {name}: unsupported dtype {sl.get_dtype()}")
                    self._infos[name] = TensorInfo(name, tuple(sl.get_shape()), dtype, file)
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

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
