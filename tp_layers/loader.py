"""Loading a module's weights from a directory of safetensors shards, each rank reading only
its slices.

``load_weights(module, path)`` maps every parameter (and persistent buffer) of ``module`` to the
checkpoint tensor of the same state-dict name: parallel layers take their shard through their
``weight_loader`` rules from a lazy :class:`quant.checkpoint.StoredTensor` (only this rank's
rows / columns are read, with positional file reads straight into the staged tensor: one copy,
no mmap), everything else is read whole (replicated). Float and msmodelslim-quantized
directories (``quant_model_description.json``) both work. No pickle anywhere: ``.bin`` / ``.pt``
checkpoints are refused with the conversion to use.

Loading is atomic: every tensor is read and checked (name, shape, dtype, finite non-zero scales,
quant description vs the layer's scheme) into staging tensors first; the module is only touched
once all of them succeeded, and restored if processing fails, so a failed load leaves every
parameter bit-identical to before.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.checkpoint import CheckpointReader
from tp_layers.embedding import VocabParallelEmbedding
from tp_layers.linear import ParallelLinearBase

__all__ = ["CheckpointError", "LoadReport", "load_weights"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# modules that shard their own checkpoint tensors (checkpoint_params / load_into / process)
_SHARDED = (ParallelLinearBase, VocabParallelEmbedding)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the module; the message names the file and tensor."""


@dataclasses.dataclass
class LoadReport:
    """What a load read: tensor names, bytes and slice reads (per rank)."""

    loaded: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    bytes_read: int = 0
    reads: int = 0
    files: list[str] = dataclasses.field(default_factory=list)

    def _count(self, nbytes: int) -> None:
        """One read of ``nbytes`` (the bytes delivered: this rank's part of a tensor)."""
        self.bytes_read += nbytes
        self.reads += 1


def _open(path: str | os.PathLike[str]) -> CheckpointReader:
    p = Path(path)
    if (p.is_file() and p.suffix in _PICKLE_SUFFIXES) or (
        p.is_dir()
        and not any(p.glob("*.safetensors"))
        and any(f.suffix in _PICKLE_SUFFIXES for f in p.iterdir())
    ):
        raise CheckpointError(
            f"{p}: pickle-based checkpoints (.bin/.pt) are refused (loading them can execute code); "
            'convert once with: python -c "import torch, safetensors.torch as s; '
            "s.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\" "
            "or transformers' save_pretrained(..., safe_serialization=True)"
        )
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {p}")
    try:
        return CheckpointReader(p)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{p}: {e}") from e
    except Exception as e:  # safetensors' own errors: truncated file, corrupted header, ...
        raise CheckpointError(f"{p}: unreadable safetensors file ({type(e).__name__}: {e})") from e


def _target_device(t: torch.Tensor) -> torch.device:
    return torch.device("cpu") if t.device.type == "meta" else t.device


def load_weights(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    ignore_missing: Iterable[str] = (),
    prefix: str = "",
    process: bool = True,
) -> LoadReport:
    """Load ``module``'s parameters from the safetensors directory ``path`` (atomic).

    prefix: prepended to module state-dict names to get checkpoint names. strict: an unexpected
    checkpoint tensor is an error (else a warning listing them). ignore_missing: glob patterns
    of names that may be absent (e.g. tied ``lm_head.weight``). process: run
    ``process_weights_after_loading`` on every parallel layer afterwards.
    """
    reader = _open(path)
    report = LoadReport(files=[str(f) for f in reader.files])
    ignore = list(ignore_missing)
    layers = {name: m for name, m in module.named_modules() if isinstance(m, _SHARDED)}
    staged: list[tuple[nn.Module, str, torch.Tensor, bool]] = []  # (owner, attr, tensor, is_param)
    consumed: set[str] = set()
    missing: list[str] = []
    try:
        for mname, layer in layers.items():
            _stage_layer(
                reader,
                layer,
                prefix + (mname + "." if mname else ""),
                staged,
                consumed,
                missing,
                report,
            )
        for owner_name, owner in module.named_modules():
            if isinstance(owner, _SHARDED):
                continue
            tensors = [(n, p, True) for n, p in owner._parameters.items() if p is not None]
            tensors += [
                (n, b, False)
                for n, b in owner._buffers.items()
                if b is not None and n not in owner._non_persistent_buffers_set
            ]
            for attr, t, is_param in tensors:
                full = prefix + (owner_name + "." if owner_name else "") + attr
                if full not in reader:
                    if not is_param:
                        continue  # buffers absent from checkpoints keep their values
                    missing.append(full)
                    continue
                info = reader.info(full)
                if tuple(info.shape) != tuple(t.shape):
                    raise CheckpointError(
                        f"{info.file.name}: {full}: shape {list(info.shape)} does not match the module's {list(t.shape)}"
                    )
                if info.dtype.is_floating_point != t.dtype.is_floating_point:
                    raise CheckpointError(
                        f"{info.file.name}: {full}: dtype {info.dtype} does not match the module's {t.dtype}"
                    )
                device = _target_device(t)
                try:
                    stored = reader.tensor(full, on_read=report._count)
                    data = stored.read(out=torch.empty(t.shape, dtype=t.dtype, device=device))
                except (ValueError, OSError) as e:
                    raise CheckpointError(f"{info.file.name}: {full}: {e}") from e
                staged.append((owner, attr, data, is_param))
                consumed.add(full)
                report.loaded.append(full)
        missing = [m for m in missing if not any(fnmatch.fnmatchcase(m, pat) for pat in ignore)]
        if missing:
            raise CheckpointError(
                f"{reader.path}: missing tensors: {', '.join(missing[:20])}"
                + (" ..." if len(missing) > 20 else "")
            )
        unexpected = sorted(set(n for n in reader.names() if n.startswith(prefix)) - consumed)
        report.unexpected = unexpected
        if unexpected:
            where = ", ".join(f"{n} ({reader.info(n).file.name})" for n in unexpected[:20])
            if strict:
                raise CheckpointError(
                    f"{reader.path}: unexpected tensors not used by the module: {where}"
                )
            warnings.warn(
                f"load_weights: ignoring {len(unexpected)} unexpected tensors: {where}",
                stacklevel=2,
            )
    finally:
        reader.close()
    _commit(module, layers, staged, process)
    return report


def _stage_layer(
    reader: CheckpointReader,
    layer: ParallelLinearBase,
    base: str,
    staged: list,
    consumed: set[str],
    missing: list[str],
    report: LoadReport,
) -> None:
    """Stage one parallel layer's shards (per segment when the checkpoint splits them)."""
    module_name = base[:-1]
    desc = reader.quant_type(f"{module_name}.weight") if f"{module_name}.weight" in reader else None
    sources: dict[Any, str] = getattr(layer, "segment_sources", None) or {}
    if desc is not None and reader.description is not None and desc != layer.scheme.name:
        raise CheckpointError(
            f"{module_name}: the quant description says {desc} but the layer is {layer.scheme.name}"
        )
    for pname, p in layer.checkpoint_params().items():
        dest = torch.empty(p.raw_shape, dtype=p.raw_dtype, device=_target_device(p))
        full = base + pname
        if full in reader:
            pieces = [(full, None)]
        elif sources and all(f"{src}.{pname}" in reader for src in sources.values()):
            pieces = [(f"{src}.{pname}", sid) for sid, src in sources.items()]
        elif not p.spec.required:
            dest.zero_()
            staged.append((layer, pname, dest, True))
            continue
        else:
            missing.append(full)
            continue
        for name, shard_id in pieces:
            info = reader.info(name)
            try:
                # positional reads into dest: no mmap, so no file pages in RSS (an mmap'd
                # k-sliced row-parallel weight faulted in most pages of the whole tensor)
                layer.load_into(pname, dest, reader.tensor(name, on_read=report._count), shard_id)
            except (ValueError, OSError) as e:
                raise CheckpointError(f"{info.file.name}: {name}: {e}") from e
            consumed.add(name)
            report.loaded.append(name)
        staged.append((layer, pname, dest, True))


def _commit(
    module: nn.Module, layers: dict[str, ParallelLinearBase], staged: list, process: bool
) -> None:
    """Swap the staged tensors in; restore everything if processing fails."""
    backup_layers = [
        (
            lyr,
            lyr._processed,
            dict(lyr.op_args),
            {n: p.data for n, p in lyr.checkpoint_params().items()},
        )
        for lyr in layers.values()
    ]
    backup = []
    for owner, attr, _t, is_param in staged:
        old = (owner._parameters if is_param else owner._buffers)[attr]
        backup.append((owner, attr, old, old.data if is_param else None, is_param))
    touched = {id(owner) for owner, *_ in staged}
    try:
        for lyr in layers.values():
            if id(lyr) in touched:
                lyr._processed = False
                lyr.op_args = {}
        for owner, attr, t, is_param in staged:
            if is_param:
                old = owner._parameters[attr]
                if old.device.type == "meta" or old.device != t.device:
                    new = nn.Parameter(t, requires_grad=False)
                    new.__dict__.update(
                        {k: v for k, v in old.__dict__.items() if not k.startswith("_")}
                    )
                    owner._parameters[attr] = new
                else:
                    old.data = t
            else:
                owner._buffers[attr] = t
        if process:
            for lyr in layers.values():
                lyr.process_weights_after_loading()
    except BaseException:
        for owner, attr, old, old_data, is_param in backup:
            (owner._parameters if is_param else owner._buffers)[attr] = old
            if is_param:
                old.data = old_data
        for lyr, processed, op_args, datas in backup_layers:
            for n, p in lyr.checkpoint_params().items():
                p.data = datas[n]
            lyr._processed, lyr.op_args = processed, op_args
        raise
