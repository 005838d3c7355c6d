"""Loading a module's weights from a directory of safetensors shards, each rank reading only
its slices.

``load_weights(module, path)`` maps every parameter (and persistent buffer) of ``module`` to the
checkpoint tensor of the same state-dict name: parallel layers take their shard through their
``weight_loader`` rules from a lazy :class:`quant.checkpoint.StoredTensor` (only this rank's
rows / columns are read, with positional file reads straight into the staged tensor: one copy,
no mmap), everything else is read whole (replicated). Float and msmodelslim-quantized
directories (``quant_model_description.json``) both work. No pickle anywhere: ``.bin`` / ``.pt``
checkpoints are refused with the conversion to use.

Loading is atomic, on every rank of the TP group together: every tensor is read and checked
(name, shape, dtype, scales finite and non-zero in the dtype the kernels use, quant description
vs the layer's scheme) into staging tensors, and the kernel arguments are computed from them;
then the ranks agree on success with one small collective (``agree``); only if every rank
succeeded does any rank touch its module. Otherwise every rank raises the same
:class:`CheckpointError`, naming the rank, file and tensor that failed, and keeps its weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from quant.checkpoint import CheckpointReader
from tp_layers.context import TPContext
from tp_layers.param import ShardedModule, set_data

__all__ = ["CheckpointError", "LoadReport", "agree", "load_layer", "load_weights"]

T = TypeVar("T")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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


def agree(tp: TPContext | None, stage: Callable[[], T]) -> T:
    """Run ``stage`` on this rank, then agree with the TP group (one ``all_gather_object`` of
    the error text, or None): if any rank failed, every rank raises the same CheckpointError
    naming the first failed rank; else return ``stage()``'s result. World size 1: no
    collective, the stage's own exception propagates."""
    error: Exception | None = None
    result: Any = None
    try:
        result = stage()
    except Exception as e:  # reported to the peers, raised below on every rank
        error = e
    if tp is not None and tp.size > 1:
        texts: list[str | None] = [None] * tp.size
        dist.all_gather_object(texts, None if error is None else str(error), group=tp.group)
        failed = [(r, t) for r, t in enumerate(texts) if t is not None]
        if failed:
            rank, text = failed[0]
            raise CheckpointError(
                f"rank {rank}: {text} (load refused on all {tp.size} ranks of the TP group; "
                "no rank changed its weights)"
            ) from error
    if error is not None:
        raise error
    return result


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
    skip: Iterable[str] = (),
) -> LoadReport:
    """Load ``module``'s parameters from the safetensors directory ``path`` (atomic, on every
    rank of the layers' TP group together).

    prefix: prepended to module state-dict names to get checkpoint names. strict: an unexpected
    checkpoint tensor is an error (else a warning listing them). ignore_missing: glob patterns
    of names that may be absent (e.g. tied ``lm_head.weight``). process: run
    ``process_weights_after_loading`` on every parallel layer afterwards. skip: names of
    parallel layers the caller loads itself (``load_layer``): their checkpoint tensors are
    neither read nor unexpected.
    """
    skipped = set(skip)
    sharded = {name: m for name, m in module.named_modules() if isinstance(m, ShardedModule)}
    if skipped - sharded.keys():
        raise ValueError(
            f"skip: not parallel layers of the module: {sorted(skipped - sharded.keys())}"
        )
    layers = {name: m for name, m in sharded.items() if name not in skipped}
    tp = next(iter(sharded.values())).tp if sharded else None
    owned = tuple(prefix + name + "." for name in skipped)
    opts = (strict, list(ignore_missing), prefix, process, owned)
    report, staged, where = agree(tp, lambda: _stage(module, layers, path, *opts))
    if report.unexpected:
        warnings.warn(
            f"load_weights: ignoring {len(report.unexpected)} unexpected tensors: {where}",
            stacklevel=2,
        )
    _commit(layers, staged)
    return report


def _stage(
    module: nn.Module,
    layers: dict[str, ShardedModule],
    path: str | os.PathLike[str],
    strict: bool,
    ignore: list[str],
    prefix: str,
    process: bool,
    owned: tuple[str, ...],
) -> tuple[LoadReport, list, str]:
    """Read and check everything into staging tensors; the module is not touched."""
    reader = _open(path)
    report = LoadReport(files=[str(f) for f in reader.files])
    staged: list[tuple[nn.Module, Any, Any, bool]] = []  # (owner, attr or args, tensors, param)
    consumed: set[str] = set()
    missing: list[str] = []
    try:
        for mname, layer in layers.items():
            base = prefix + (mname + "." if mname else "")
            dests = _stage_layer(reader, layer, base, consumed, missing, report)
            if dests is not None:
                args = layer.method.process_weights_after_loading(layer, dests) if process else None
                staged.append((layer, args, dests, True))
        for owner_name, owner in module.named_modules():
            if not isinstance(owner, ShardedModule):
                base = prefix + (owner_name + "." if owner_name else "")
                _stage_plain(reader, owner, base, staged, consumed, missing, report)
        missing = [m for m in missing if not any(fnmatch.fnmatchcase(m, p) for p in ignore)]
        if missing:
            raise CheckpointError(
                f"{reader.path}: missing tensors: {', '.join(missing[:20])}"
                + (" ..." if len(missing) > 20 else "")
            )
        report.unexpected = sorted(
            set(n for n in reader.names() if n.startswith(prefix) and not n.startswith(owned))
            - consumed
        )
        where = ", ".join(f"{n} ({reader.info(n).file.name})" for n in report.unexpected[:20])
        if report.unexpected and strict:
            raise CheckpointError(
                f"{reader.path}: unexpected tensors not used by the module: {where}"
            )
    finally:
        reader.close()
    return report, staged, where if report.unexpected else ""


def _stage_plain(
    reader: CheckpointReader,
    owner: nn.Module,
    base: str,
    staged: list,
    consumed: set[str],
    missing: list[str],
    report: LoadReport,
) -> None:
    """Stage a non-parallel module's own parameters and persistent buffers (read whole)."""
    tensors = [(n, p, True) for n, p in owner._parameters.items() if p is not None]
    tensors += [
        (n, b, False)
        for n, b in owner._buffers.items()
        if b is not None and n not in owner._non_persistent_buffers_set
    ]
    for attr, t, is_param in tensors:
        full = base + attr
        if full not in reader:
            if is_param:  # buffers absent from checkpoints keep their values
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
        try:
            stored = reader.tensor(full, on_read=report._count)
            dest = torch.empty(t.shape, dtype=t.dtype, device=_target_device(t))
            data = stored.read(out=dest)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{info.file.name}: {full}: {e}") from e
        staged.append((owner, attr, data, is_param))
        consumed.add(full)
        report.loaded.append(full)


def _stage_layer(
    reader: CheckpointReader,
    layer: ShardedModule,
    base: str,
    consumed: set[str],
    missing: list[str],
    report: LoadReport,
) -> dict[str, torch.Tensor] | None:
    """Stage one parallel layer's shards; None if a tensor is missing (reported)."""
    module_name = base[:-1]
    desc = reader.quant_type(f"{module_name}.weight") if f"{module_name}.weight" in reader else None
    if desc is not None and reader.description is not None and desc != layer.scheme.name:
        raise CheckpointError(
            f"{module_name}: the quant description says {desc} but the layer is {layer.scheme.name}"
        )
    dests: dict[str, torch.Tensor] = {}
    for pname, p in layer.checkpoint_params().items():
        dest = p.empty()
        full = base + pname
        if full not in reader:
            if p.spec.required:
                missing.append(full)
            dests[pname] = dest.zero_()
            continue
        try:
            # positional reads into dest: no mmap, so no file pages in RSS (an mmap'd
            # k-sliced row-parallel weight faulted in most pages of the whole tensor)
            layer.load_into(pname, dest, reader.tensor(full, on_read=report._count))
        except (ValueError, OSError) as e:
            text = str(e).removeprefix(f"{full}: ")  # the layer's label may repeat the name
            raise CheckpointError(f"{reader.info(full).file.name}: {full}: {text}") from e
        consumed.add(full)
        report.loaded.append(full)
        dests[pname] = dest
    return None if any(base + n in missing for n in dests) else dests


def _commit(layers: dict[str, ShardedModule], staged: list) -> None:
    """Swap the staged tensors (and kernel arguments) in; nothing here can fail."""
    for owner, attr, t, is_param in staged:
        if isinstance(owner, ShardedModule):
            owner.install(attr, t)
        elif is_param:
            set_data(owner, attr, t)
        else:
            owner._buffers[attr] = t


def load_layer(
    layer: ShardedModule,
    tensors: Mapping[str, torch.Tensor],
    *,
    local: bool = False,
    process: bool = True,
) -> None:
    """Load one parallel layer from checkpoint tensors by name: full tensors (each rank keeps
    its shard) or, with ``local``, this rank's shards (a Megatron shard). Atomic on every rank
    of ``layer.tp``, like ``load_weights``. A missing optional tensor loads as zeros."""

    def stage() -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
        dests: dict[str, torch.Tensor] = {}
        for name, p in layer.checkpoint_params().items():
            t, dest = tensors.get(name), p.empty()
            if t is None and p.spec.required:
                raise ValueError(f"{layer.where}: no {name!r} tensor to load")
            if t is None:
                dest.zero_()
            elif local:
                layer.load_local(name, dest, t)
            else:
                layer.load_into(name, dest, t)
            dests[name] = dest
        args = layer.method.process_weights_after_loading(layer, dests) if process else None
        return args, dests

    with torch.no_grad():
        layer.install(*agree(layer.tp, stage))
