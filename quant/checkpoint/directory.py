"""The JSON files of a checkpoint directory: the shard index and the quant description.

Both come from data, so both are checked before use and every error names the file (and the
tensor): ``model.safetensors.index.json`` must be ``{"weight_map": {tensor: shard file}}`` with
shard paths relative to the directory and without ``..`` (refused before any shard is opened);
``quant_model_description.json`` must be a JSON object whose tensor entries are strings.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from quant.checkpoint.format import DESCRIPTION_FILE, INDEX_FILE, CheckpointFileError

__all__ = [
    "check_weight_map",
    "description_entry",
    "read_description",
    "read_index",
    "shard_paths",
]


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointFileError(path, f"{what}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointFileError(path, f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_description(root: Path) -> dict[str, Any] | None:
    """The quant description of checkpoint directory ``root`` (None if it has none)."""
    path = root / DESCRIPTION_FILE
    if not path.is_file():
        return None
    desc = _read_json_object(path, "quant description")
    group = desc.get("group_size", 0)
    if group is not None and not (isinstance(group, int) and not isinstance(group, bool)):
        raise CheckpointFileError(path, f"group_size: expected an int, got {group!r}")
    if not isinstance(desc.get("model_quant_type", "FLOAT"), str):
        raise CheckpointFileError(path, "model_quant_type: expected a string")
    return desc


def description_entry(root: Path, desc: dict[str, Any], name: str) -> str:
    """The description's quant type of tensor ``name`` (``"FLOAT"`` when absent)."""
    value = desc.get(name, "FLOAT")
    if not isinstance(value, str):
        raise CheckpointFileError(
            root / DESCRIPTION_FILE, f"expected a quant type string, got {value!r}", name
        )
    return value


def _check_shard_path(index: Path, name: str, file: Any) -> None:
    if not isinstance(file, str) or not file:
        raise CheckpointFileError(
            index, f"weight_map: expected a shard file name, got {file!r}", name
        )
    posix, win = PurePosixPath(file), PureWindowsPath(file)
    if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts + win.parts:
        raise CheckpointFileError(
            index,
            f"weight_map: shard path {file!r} leaves the checkpoint directory (absolute or "
            "'..'); shard paths must be relative to the directory",
            name,
        )


def read_index(root: Path) -> dict[str, str] | None:
    """The index's weight_map (tensor -> shard path relative to ``root``; None without an
    index), every path checked to stay inside ``root``."""
    path = root / INDEX_FILE
    if not path.is_file():
        return None
    wmap = _read_json_object(path, "shard index").get("weight_map")
    if not isinstance(wmap, dict):
        raise CheckpointFileError(
            path, "shard index: no 'weight_map' object ({tensor name: shard file})"
        )
    for name, file in wmap.items():
        _check_shard_path(path, name, file)
    return wmap


def shard_paths(root: Path, wmap: dict[str, str] | None) -> list[Path]:
    """The shard files: the index's (each must exist) or every ``*.safetensors`` in ``root``."""
    if wmap is None:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {root}")
        return files
    files = sorted({root / v for v in wmap.values()})
    missing = [str(p.relative_to(root)) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{root / INDEX_FILE}: names missing shard(s): {missing}")
    return files


def check_weight_map(root: Path, wmap: dict[str, str], stored: dict[str, Path]) -> None:
    """Every tensor of the index is stored in the shard the index names."""
    for name, file in wmap.items():
        where = stored.get(name)
        if where != root / file:
            found = "in no shard" if where is None else f"in {where.name}"
            raise CheckpointFileError(
                root / INDEX_FILE, f"weight_map says {file}, but the tensor is stored {found}", name
            )
