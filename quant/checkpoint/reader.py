"""``CheckpointReader``: a checkpoint directory (quantized or plain Hugging Face safetensors).

Opens every shard once at construction (``SafetensorsFile``: header checked, descriptor kept),
so the listing, the metadata and every later read come from the same open files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from quant.checkpoint.directory import (
    check_weight_map,
    description_entry,
    read_description,
    read_index,
    shard_paths,
)
from quant.checkpoint.format import DESCRIPTION_FILE, CheckpointFileError
from quant.checkpoint.safetensors_file import SafetensorsFile, StoredTensor, TensorInfo
from quant.schemes import Scheme, scheme_from_name

__all__ = ["CheckpointReader"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class CheckpointReader:
    """Lazy view of a checkpoint directory: lists tensors and their metadata from the
    safetensors headers; ``tensor(name)`` / ``get_slice(name)`` give a :class:`StoredTensor`
    (index it, or ``read`` ranges of it, to read only part of a tensor); ``get_tensor(name)``
    reads one whole tensor. Every error names the file (and tensor). Use as a context manager,
    or call ``close``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.path}")
        self.description: dict[str, Any] | None = read_description(self.path)
        wmap = read_index(self.path)
        self._paths = shard_paths(self.path, wmap)
        self._files: dict[Path, SafetensorsFile] = {}
        self._infos: dict[str, TensorInfo] = {}
        try:
            for file in self._paths:
                self._open(file)
            if wmap is not None:
                check_weight_map(self.path, wmap, {n: i.file for n, i in self._infos.items()})
        except BaseException:
            self.close()
            raise

    def _open(self, file: Path) -> None:
        st = SafetensorsFile(file)
        self._files[file] = st
        for name, info in st.tensors.items():
            if name in self._infos:
                raise CheckpointFileError(
                    file, f"stored twice (also in {self._infos[name].file.name})", name
                )
            self._infos[name] = info

    # -- listing / metadata --------------------------------------------------------------------

    @property
    def files(self) -> list[Path]:
        return list(self._paths)

    def names(self) -> list[str]:
        """All tensor names, in file order then name order."""
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
        for file in self._paths:
            yield file, [i for i in self._infos.values() if i.file == file]

    @property
    def model_quant_type(self) -> str:
        return str((self.description or {}).get("model_quant_type", "FLOAT"))

    @property
    def group_size(self) -> int:
        return int((self.description or {}).get("group_size", 0) or 0)

    def quant_type(self, name: str) -> str:
        """Description entry of a tensor (``"FLOAT"`` for a plain float checkpoint)."""
        if self.description is None:
            return "FLOAT"
        return description_entry(self.path, self.description, name)

    def layer_scheme(self, module: str) -> Scheme:
        """Scheme of a linear layer from the description entry of ``module + ".weight"``."""
        try:
            return scheme_from_name(self.quant_type(f"{module}.weight"), self.group_size)
        except (TypeError, ValueError) as e:
            if isinstance(e, CheckpointFileError):
                raise
            raise CheckpointFileError(
                self.path / DESCRIPTION_FILE, str(e), f"{module}.weight"
            ) from e

    def validate_layer(self, module: str) -> Scheme:
        """Check a layer's stored tensors against its scheme's ``tensor_specs``; return the
        scheme. Raises :class:`CheckpointFileError` naming the file and tensor on any mismatch
        or missing tensor."""
        scheme = self.layer_scheme(module)
        w = self.info(f"{module}.weight")
        if len(w.shape) != 2:
            raise CheckpointFileError(w.file, f"expected 2-D, got {list(w.shape)}", w.name)
        n, k = w.shape
        model_dtype = self._model_dtype(module)
        for spec in scheme.tensor_specs(n, k, f"{module}.bias" in self, model_dtype):
            full = f"{module}.{spec.name}"
            if full not in self:
                if spec.required:
                    raise CheckpointFileError(
                        self.path, f"missing from checkpoint ({scheme.name} layer)", full
                    )
                continue
            info = self.info(full)
            try:
                spec.check(info.shape, info.dtype, where=module)
            except ValueError as e:
                raise CheckpointFileError(info.file, str(e)) from None
        return scheme

    def _model_dtype(self, module: str) -> torch.dtype:
        for suffix in ("weight", "input_scale", "weight_scale", "bias"):
            name = f"{module}.{suffix}"
            if name in self and self.info(name).dtype in _FLOATS:
                return self.info(name).dtype
        deq = f"{module}.deq_scale"
        if deq in self:
            return torch.float16 if self.info(deq).dtype == torch.int64 else torch.bfloat16
        return torch.bfloat16

    # -- data ----------------------------------------------------------------------------------

    def tensor(self, name: str, on_read: Callable[[int], None] | None = None) -> StoredTensor:
        """A :class:`StoredTensor`: reads ranges of ``name`` with positional reads straight
        into caller memory. ``on_read(nbytes)`` is called after every read with the bytes
        delivered."""
        info = self.info(name)
        st = self._files.get(info.file)
        if st is None:
            raise ValueError(f"{self.path}: the reader is closed")
        return StoredTensor(info, st, on_read)

    def get_slice(self, name: str) -> StoredTensor:
        """Like ``safe_open(file).get_slice(name)``: index it (``sl[a:b]``, ``sl[:, c:d]``) to
        read only that part; ``sl.get_shape()`` / ``sl.get_dtype()`` give metadata."""
        return self.tensor(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        """One whole tensor (CPU, stored dtype)."""
        return self.tensor(name).read()

    def close(self) -> None:
        files, self._files = self._files, {}
        for st in files.values():
            st.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
