"""Names, dtypes and errors of the checkpoint format (shared by the reader and the writer)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = [
    "DESCRIPTION_FILE",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "CheckpointFileError",
    "FileChangedError",
    "dtype_from_safetensors",
    "parse_size",
]

DESCRIPTION_FILE = "quant_model_description.json"
INDEX_FILE = "model.safetensors.index.json"
FORMAT_VERSION = "1.0.0"

ST_DTYPES: dict[str, torch.dtype] = {
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
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be used. The message starts with the file's path (and the
    tensor's name where one is involved): ``"ckpt/model-00002-of-00044.safetensors: w: ..."``."""

    def __init__(self, file: str | os.PathLike[str], what: str, tensor: str | None = None):
        self.file = Path(file)
        self.tensor = tensor
        super().__init__(f"{self.file}: {tensor + ': ' if tensor else ''}{what}")


class FileChangedError(CheckpointFileError):
    """A file was replaced or modified while it was being read (offsets from its header would
    point into other data)."""


def dtype_from_safetensors(name: str) -> torch.dtype:
    """torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    try:
        return ST_DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {name}") from None


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"200MB"``, ``"64KiB"``, ``"1000"`` -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace("IB", "B")
    try:
        for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
            if s.endswith(unit):
                return int(float(s[: -len(unit)]) * mult)
        return int(s)
    except ValueError:
        raise ValueError(f"size {text!r}: expected bytes or a number with KB/MB/GB") from None
