"""``load_pretrained``: a causal LM from a model directory, built on the meta device, swapped by
``parallelize`` and loaded shard by shard (``tp_layers.load_weights``), in the checkpoint's dtype
unless told otherwise."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import transformers
from torch import nn

from quant.checkpoint import DESCRIPTION_FILE, CheckpointReader
from quant.schemes import Scheme
from tp_layers.context import TPContext, get_tp
from tp_layers.embedding import VocabParallelEmbedding
from tp_layers.hf.quantize import CalibrationSpec, QuantSpec, layer_tensors
from tp_layers.hf.swap import parallelize
from tp_layers.linear import ParallelLinearBase
from tp_layers.loader import CheckpointError, LoadReport, load_layer, load_weights

__all__ = ["checkpoint_dtype", "load_pretrained"]


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """{tied parameter name: the name it is tied to}, e.g. lm_head.weight -> embed weight."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(keys, Mapping) and keys:
        return dict(keys)
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None else None
    if text is None or not getattr(text, "tie_word_embeddings", False):
        return {}
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


def _retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    for target, source in tied.items():
        src = model.get_parameter(source)
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        if getattr(owner, attr, None) is src:  # tied by construction (ParallelLMHead)
            continue
        if isinstance(owner, ParallelLinearBase | VocabParallelEmbedding):
            raise ValueError(f"{target}: a tied weight cannot be a parallel layer's")
        owner._parameters[attr] = src


def _meta_buffers(mod: nn.Module) -> list[str]:
    return [n for n, b in mod._buffers.items() if b is not None and b.device.type == "meta"]


def _init_buffers(mod: nn.Module, names: list[str], init) -> None:
    """Fill ``mod``'s meta float buffers ``names`` (rotary ``inv_freq``, Gemma's scaled
    embedding ``embed_scale``) with the model's ``_init_weights`` run on a shallow stand-in
    whose parameters stay on meta, so loaded weights are untouched; a buffer the init does not
    write (still NaN) stays on meta."""
    stand_in = copy.copy(mod)
    stand_in._parameters = {
        k: None if v is None else nn.Parameter(v.to("meta"), requires_grad=False)
        for k, v in mod._parameters.items()
    }
    stand_in._buffers = dict(mod._buffers)
    for n in names:
        b = mod._buffers[n]
        if b.is_floating_point():
            stand_in._buffers[n] = torch.full(b.shape, float("nan"), dtype=b.dtype)
    with torch.no_grad():
        init(stand_in)
    for n in names:
        b = stand_in._buffers[n]
        if b is not None and b.device.type != "meta" and not bool(b.isnan().any()):
            mod._buffers[n] = b


def _rebuild_buffers(model: nn.Module) -> None:
    """Recompute the buffers a meta-built model lost (rotary ``inv_freq``...): parameter-free
    modules are re-instantiated on CPU from their config; others fall back to the model's own
    ``_init_weights`` (``_init_buffers``). Raises RuntimeError naming any buffer left on meta."""
    for mod in model.modules():
        names = _meta_buffers(mod)
        if not names:
            continue
        fresh = None
        config = getattr(mod, "config", None)
        if config is not None and next(mod.parameters(), None) is None:
            try:
                with torch.device("cpu"):
                    fresh = type(mod)(config)
            except Exception:  # any constructor signature: fall back below
                fresh = None
        if fresh is not None:
            for n in names:
                mod._buffers[n] = fresh._buffers[n]
            continue
        init = getattr(model, "_init_weights", None)
        if init is not None:
            _init_buffers(mod, names, init)
    left = [
        f"{mname}.{n}" if mname else n
        for mname, mod in model.named_modules()
        for n in _meta_buffers(mod)
    ]
    left += [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(
            f"tensors still on the meta device after loading (not in the checkpoint and not "
            f"recomputable): {', '.join(left[:20])}"
        )


def _read_config(model_dir: Path) -> transformers.PretrainedConfig:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a model directory)")
    return transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)


def checkpoint_dtype(model_dir: str | os.PathLike[str], config=None) -> torch.dtype:
    """The float dtype a model directory was saved in: config.json's ``dtype`` /
    ``torch_dtype``, else the float dtype holding most of the stored bytes."""
    path = Path(model_dir)
    config = config if config is not None else _read_config(path)
    for attr in ("dtype", "torch_dtype"):
        d = getattr(config, attr, None)
        if isinstance(d, str):
            d = getattr(torch, d, None)
        if isinstance(d, torch.dtype) and d.is_floating_point:
            return d
    nbytes: dict[torch.dtype, int] = {}
    with CheckpointReader(path) as reader:
        for name in reader.names():
            info = reader.info(name)
            if info.dtype.is_floating_point:
                size = info.dtype.itemsize * int(torch.Size(info.shape).numel())
                nbytes[info.dtype] = nbytes.get(info.dtype, 0) + size
    return max(nbytes, key=nbytes.get) if nbytes else torch.float32


def _build_meta(config: transformers.PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _parallel_layers(model: nn.Module) -> Iterator[tuple[str, ParallelLinearBase]]:
    for name, mod in model.named_modules():
        if isinstance(mod, ParallelLinearBase):
            yield name, mod


def _swap_meta(model: nn.Module, path: Path, tp: TPContext, quant: QuantSpec, **kw) -> bool:
    """parallelize the meta model, schemes from the msmodelslim description if there is one;
    returns whether there is."""
    if not (path / DESCRIPTION_FILE).is_file():
        parallelize(model, tp, quant=quant, **kw)
        return False
    if quant is not None:
        raise ValueError(
            f"{path} is an msmodelslim checkpoint ({DESCRIPTION_FILE}); its description sets "
            "every layer's scheme: pass quant=None"
        )
    with CheckpointReader(path) as reader:

        def from_description(name: str) -> Scheme | None:
            return reader.layer_scheme(name) if f"{name}.weight" in reader else None

        parallelize(model, tp, quant=from_description, **kw)
    return True


def _load_quantizing(
    model: nn.Module,
    path: Path,
    on_load: dict[str, ParallelLinearBase],
    strict: bool,
    tied: Mapping[str, str],
    dtype: torch.dtype,
    calibration: CalibrationSpec,
) -> LoadReport:
    """load_weights for the rest (one agreed step), then each quantize-on-load layer from its
    full float weight (read once, quantized, padded and sharded by ``load_layer``: one agreed
    step per layer)."""
    report = load_weights(model, path, strict=strict, ignore_missing=list(tied), skip=on_load)
    with CheckpointReader(path) as reader, torch.no_grad():
        for name, layer in on_load.items():
            names = [f"{name}.weight"] + ([f"{name}.bias"] if layer.has_bias else [])
            absent = [n for n in names if n not in reader]
            if absent:
                raise CheckpointError(f"{path}: missing tensors: {', '.join(absent)}")
            full = [reader.get_tensor(n).to(dtype) for n in names]
            bias = full[1] if layer.has_bias else None
            load_layer(layer, layer_tensors(name, full[0], bias, layer.scheme, dtype, calibration))
            report.loaded += names
    return report


def load_pretrained(
    model_dir: str | os.PathLike[str],
    tp: TPContext | None = None,
    quant: QuantSpec = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    *,
    plan: Mapping[str, str] | None = None,
    calibration: CalibrationSpec = None,
    pad_heads: bool = False,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Build a causal LM from ``model_dir``'s config.json on the meta device, swap its layers
    (``parallelize``, with ``plan`` / ``pad_heads``), and load only this rank's shards
    (``tp_layers.load_weights``).

    Peak memory per rank is about 1 / TP of the sharded weights (linear layers, embedding,
    lm_head) plus the replicated ones (norms). quant: for an msmodelslim directory (with
    quant_model_description.json) leave it None: every layer gets the scheme its description
    names. For a float directory, a quant spec as for ``parallelize`` quantizes on load (each
    quantized layer's full float weight is read once, quantized, and only this rank's shard
    kept; static W8A8 needs ``calibration``). dtype: the model's float dtype (default: the
    checkpoint's, ``checkpoint_dtype``). strict: unexpected checkpoint tensors are an error
    (else a warning). Tied weights (lm_head = embed_tokens) stay tied, and non-persistent
    buffers (rotary ``inv_freq``) are recomputed. sequence_parallel: as for ``parallelize``.
    Returns the model in eval mode; its
    ``tp_load_report`` is the loader's LoadReport.
    """
    path = Path(model_dir)
    config = _read_config(path)
    tp = tp if tp is not None else get_tp()
    dtype = dtype if dtype is not None else checkpoint_dtype(path, config)
    model = _build_meta(config, dtype)
    quantized_dir = _swap_meta(
        model,
        path,
        tp,
        quant,
        plan=plan,
        calibration=calibration,
        pad_heads=pad_heads,
        sequence_parallel=sequence_parallel,
    )
    tied = _tied_keys(model)
    on_load = (
        {} if quantized_dir else {n: m for n, m in _parallel_layers(model) if m.scheme.is_quantized}
    )
    if on_load:
        report = _load_quantizing(model, path, on_load, strict, tied, dtype, calibration)
    else:
        report = load_weights(model, path, strict=strict, ignore_missing=list(tied))
    _retie(model, tied)
    _rebuild_buffers(model)
    gen = path / "generation_config.json"
    if gen.is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(
            str(path), local_files_only=True
        )
    model.tp_load_report = report
    model.eval()
    return model
