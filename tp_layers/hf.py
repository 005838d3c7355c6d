"""Hugging Face transformers adapter: tensor-parallel swapping of a model's ``nn.Linear`` layers
by its tensor-parallel plan, and sharded loading of a model directory.

    import tp_layers
    tp = tp_layers.init_tp()                              # torchrun: the world group
    model = tp_layers.load_pretrained("path/to/model")    # this rank's shards only
    model.generate(ids, max_new_tokens=32)                # prefill fused, decode unfused

    model = tp_layers.parallelize(hf_model, quant=W8A16())  # an already built model

Plan vocabulary (``config.base_model_tp_plan``, keys relative to the base model, e.g.
``"layers.*.self_attn.q_proj"``; transformers 5.x ``distributed/tensor_parallel.py``):

==============================================  =================================================
style                                           what parallelize does
==============================================  =================================================
``colwise``, ``local_colwise``                  ColumnParallelLinear (output sharded, heads local)
``colwise_rep``, ``colwise_gather_output``      ColumnParallelLinear(gather_output=True)
``rowwise``, ``local_rowwise``                  RowParallelLinear (input sharded; fused prefill)
``rowwise_rep``, ``rowwise_split_input``        RowParallelLinear(input_is_parallel=False)
``packed_colwise``, ``local_packed_colwise``    MergedColumnParallelLinear, 2 equal segments
                                                (a packed gate_up: rank r holds [gate_r | up_r])
``replicate``, ``replicated_with_grad_allreduce``,
``sequence_parallel``, ``gather``, ``local``,   left as is, replicated (no sequence parallelism:
``isolated``, ``embedding_rowwise``,            norms see the full sequence; embeddings and
``embedding_colwise``                           lm_head stay replicated)
anything else (``packed_rowwise``, MoE / expert
styles, ``mla_kv_a_proj``, ``all_reduce``,      refused with an error naming the plan entry
``local_params``, unknown names)
==============================================  =================================================

A user ``plan`` is a dict of module-name globs (``fnmatch``, relative to the model given) to
``"colwise"`` / ``"rowwise"`` (or any style above).

Attention keeps working with local head counts: a column-sharded q projection gives each rank
``heads / tp`` whole heads (the heads must divide), k / v projections are sharded by kv head, and
with fewer kv heads than ranks each kv head is replicated on ``tp / kv`` ranks (rank r holds kv
head ``r * kv // tp``). The attention module's head-count attributes (``num_key_value_groups``,
``num_heads``, ``num_key_value_heads``, ...) are set to the local counts. The model's config is
left untouched (a StaticCache sized from it would not fit; generate's default DynamicCache does).

transformers is imported only in this module; ``import tp_layers`` works without it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from quant.algorithms import ActivationRange, MinMaxObserver, quantize_linear
from quant.calibration import Calibration
from quant.checkpoint import DESCRIPTION_FILE, CheckpointReader
from quant.schemes import Scheme
from tp_layers.context import TPContext, get_tp
from tp_layers.linear import (
    ColumnParallelLinear,
    HeadReplicatedColumnLinear,
    MergedColumnParallelLinear,
    ParallelLinearBase,
    RowParallelLinear,
)
from tp_layers.loader import CheckpointError, load_layer, load_weights

__all__ = [
    "LayerPlan",
    "load_pretrained",
    "parallelize",
    "resolve_plan",
]

QuantSpec = Scheme | Mapping[str, Scheme | None] | Callable[[str], Scheme | None] | None
CalibrationSpec = Calibration | Mapping[str, ActivationRange | torch.Tensor] | None

# style -> gather_output of the ColumnParallelLinear
_COLUMN_STYLES = {
    "colwise": False,
    "local_colwise": False,
    "colwise_rep": True,
    "colwise_gather_output": True,
}
# style -> input_is_parallel of the RowParallelLinear
_ROW_STYLES = {
    "rowwise": True,
    "local_rowwise": True,
    "rowwise_rep": False,
    "rowwise_split_input": False,
}
_PACKED_COLUMN_STYLES = {"packed_colwise", "local_packed_colwise"}
_REPLICATED_STYLES = {
    "replicate",
    "replicated_with_grad_allreduce",
    "sequence_parallel",
    "gather",
    "local",
    "isolated",
    "embedding_rowwise",
    "embedding_colwise",
}
_REFUSED_STYLES = {
    "packed_rowwise": "a packed row-parallel weight (strided k shards) is not supported",
    "local_packed_rowwise": "a packed row-parallel weight (strided k shards) is not supported",
    "mla_kv_a_proj": "MLA's kv_a projection split is not supported",
    "all_reduce": "a module-level all-reduce (MoE) is not supported",
    "moe_tp_experts": "MoE experts are not supported (nn.Linear layers only)",
    "moe_identity_expert": "MoE experts are not supported (nn.Linear layers only)",
    "ep_router": "expert parallelism is not supported",
    "grouped_gemm": "MoE grouped GEMM experts are not supported",
    "local_params": "sharded bare parameters (e.g. attention sinks) are not supported",
}
_KV_NAMES = {"k_proj", "v_proj", "key_proj", "value_proj", "key", "value"}
_Q_NAMES = {"q_proj", "query_proj", "query"}
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads")
_KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")


# --------------------------------------------------------------------------------------------
# A k / v projection with fewer kv heads than ranks
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """How one module is treated: its full name, the plan entry (key, style) that matched."""

    name: str
    key: str
    style: str


def _hf_key_regex(key: str) -> re.Pattern[str]:
    """An HF plan key (``*`` = one dotted component, e.g. a layer index) as a regex."""
    parts = [
        r"[^.]+" if p == "*" else re.escape(p).replace(r"\*", r"[^.]*") for p in key.split(".")
    ]
    return re.compile(r"\.".join(parts) + r"\Z")


def _base_prefix(model: nn.Module) -> str:
    """``"model."`` for a CausalLM whose base model is ``model.model``; "" for a base model."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + "."
    return ""


def _model_plan(model: nn.Module) -> dict[str, str]:
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None) if config is not None else None
    if not plan and config is not None and hasattr(config, "get_text_config"):
        plan = getattr(config.get_text_config(), "base_model_tp_plan", None)
    if not plan:
        name = type(config).__name__ if config is not None else type(model).__name__
        raise ValueError(
            f"{name} has no base_model_tp_plan; pass plan={{'<module glob>': 'colwise' | "
            "'rowwise', ...}}"
        )
    return dict(plan)


def resolve_plan(model: nn.Module, plan: Mapping[str, str] | None = None) -> list[LayerPlan]:
    """Match a plan against the model's modules.

    plan None: the model's ``config.base_model_tp_plan`` (keys relative to the base model,
    ``*`` = one name component); else a dict of module-name globs (``fnmatch``, relative to
    ``model``) -> style. Returns one LayerPlan per matched module, in module order. Raises
    ValueError naming the entry for a style that is refused or unknown, for a user entry that
    matches nothing, and for a module two entries give different styles.
    """
    user = plan is not None
    entries = dict(plan) if user else _model_plan(model)
    prefix = "" if user else _base_prefix(model)
    matchers: list[tuple[str, str, Callable[[str], bool]]] = []
    for key, style in entries.items():
        if not isinstance(style, str):
            raise TypeError(f"plan entry {key!r}: style must be a str, got {type(style).__name__}")
        if style in _REFUSED_STYLES:
            raise ValueError(f"plan entry {key!r} -> {style!r}: {_REFUSED_STYLES[style]}")
        known = _COLUMN_STYLES.keys() | _ROW_STYLES.keys() | _PACKED_COLUMN_STYLES
        if style not in known and style not in _REPLICATED_STYLES:
            raise ValueError(
                f"plan entry {key!r} -> {style!r}: unknown style; known: "
                + ", ".join(sorted(known | _REPLICATED_STYLES))
            )
        if user:
            matchers.append((key, style, lambda n, k=key: fnmatch.fnmatchcase(n, k)))
        else:
            rx = _hf_key_regex(prefix + key)
            matchers.append((key, style, lambda n, r=rx: r.match(n) is not None))
    out: dict[str, LayerPlan] = {}
    used: set[str] = set()
    for name, _mod in model.named_modules():
        if not name:
            continue
        for key, style, match in matchers:
            if not match(name):
                continue
            used.add(key)
            prev = out.get(name)
            if prev is not None and prev.style != style:
                raise ValueError(
                    f"{name}: plan entries {prev.key!r} -> {prev.style!r} and {key!r} -> "
                    f"{style!r} disagree"
                )
            out.setdefault(name, LayerPlan(name, key, style))
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for key, style, match in matchers:
        if key in used:
            continue
        hits = [p for p in params if match(p)]
        if hits and style not in _REPLICATED_STYLES:
            raise ValueError(
                f"plan entry {key!r} -> {style!r} targets parameter {hits[0]!r}; only nn.Linear "
                "modules can be sharded (bare parameters are not supported)"
            )
        if user and not hits:
            raise ValueError(f"plan entry {key!r} matches no module of {type(model).__name__}")
    return list(out.values())


# --------------------------------------------------------------------------------------------
# Quantization choices
# --------------------------------------------------------------------------------------------


def _quant_resolver(quant: QuantSpec) -> tuple[Callable[[str], Scheme | None], bool]:
    """(name -> scheme, whether layers outside the plan are asked too)."""
    if quant is None:
        return (lambda _name: None), False
    if isinstance(quant, Scheme):
        return (lambda _name: quant), False
    if isinstance(quant, Mapping):
        items = list(quant.items())
        for pat, s in items:
            if s is not None and not isinstance(s, Scheme):
                raise TypeError(f"quant[{pat!r}]: must be a Scheme or None, got {type(s).__name__}")

        def by_glob(name: str) -> Scheme | None:
            for pat, s in items:
                if fnmatch.fnmatchcase(name, pat):
                    return s
            return None

        return by_glob, True
    if callable(quant):

        def checked(name: str) -> Scheme | None:
            s = quant(name)
            if s is not None and not isinstance(s, Scheme):
                raise TypeError(f"quant({name!r}): must return a Scheme or None, got {s!r}")
            return s

        return checked, True
    raise TypeError(
        f"quant: expected None, a Scheme, a dict of glob -> Scheme or a callable, got {quant!r}"
    )


def _act_range(calibration: CalibrationSpec, name: str) -> ActivationRange:
    hint = (
        f"{name}: static W8A8 needs the layer's calibrated input range; pass calibration="
        "{name: ActivationRange | activations (rows, k)} (record them with "
        "quant.collect_activations on the float model) or use W8A8(dynamic=True)"
    )
    if calibration is None:
        raise ValueError(hint)
    if isinstance(calibration, Calibration):
        if name not in calibration.modules():
            raise ValueError(hint)
        return calibration.range_of(name)
    value = calibration.get(name)
    if value is None:
        raise ValueError(hint)
    if isinstance(value, ActivationRange):
        return value
    obs = MinMaxObserver()
    obs.update(value)
    return obs.range()


# --------------------------------------------------------------------------------------------
# Swapping
# --------------------------------------------------------------------------------------------


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _head_dim(attn: nn.Module) -> int | None:
    return _int_attr(attn, ("head_dim", "head_size", "attention_head_size"))


def _load_full(layer: ParallelLinearBase, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load full checkpoint tensors into ``layer`` (each rank keeps its shard) and process."""
    load_layer(layer, tensors)


def _layer_tensors(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: Scheme | None,
    dtype: torch.dtype,
    calibration: CalibrationSpec,
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one float layer under ``scheme`` (quantized if it says so)."""
    if scheme is None or not scheme.is_quantized:
        out = {"weight": weight.detach()}
        if bias is not None:
            out["bias"] = bias.detach()
        return out
    act = None
    if scheme is not None and scheme.needs_calibration:
        act = _act_range(calibration, name)
    return quantize_linear(
        weight.detach(),
        None if bias is None else bias.detach(),
        scheme,
        model_dtype=dtype,
        act_range=act,
    )


class _Swapper:
    """One parallelize call: builds the new layers and fixes attention head counts."""

    def __init__(
        self,
        model: nn.Module,
        tp: TPContext,
        resolve: Callable[[str], Scheme | None],
        calibration: CalibrationSpec,
        sequence_parallel: bool = False,
    ) -> None:
        self.sequence_parallel = sequence_parallel
        self.model = model
        self.tp = tp
        self.resolve = resolve
        self.calibration = calibration
        self.modules = dict(model.named_modules())
        self.attn_local: dict[str, dict[str, int]] = {}

    def _parent(self, name: str) -> tuple[nn.Module, str, str]:
        parent_name, _, leaf = name.rpartition(".")
        return self.modules[parent_name], parent_name, leaf

    def build(self, lp: LayerPlan, linear: nn.Linear) -> ParallelLinearBase:
        """The parallel layer replacing ``linear`` (on meta if its weight is)."""
        parent, parent_name, leaf = self._parent(lp.name)
        scheme = self.resolve(lp.name)
        common: dict[str, Any] = {
            "quant": scheme,
            "tp": self.tp,
            "params_dtype": linear.weight.dtype,
            "prefix": lp.name,
            "device": linear.weight.device,
        }
        n, k = linear.out_features, linear.in_features
        bias = linear.bias is not None
        where = f"plan entry {lp.key!r} -> {lp.style!r} ({lp.name})"
        hd = _head_dim(parent)
        tp = self.tp.size
        if lp.style in _PACKED_COLUMN_STYLES:
            if n % 2:
                raise ValueError(f"{where}: packed output size {n} is not even")
            return MergedColumnParallelLinear(k, [n // 2, n // 2], bias=bias, **common)
        if lp.style in _COLUMN_STYLES:
            gather = _COLUMN_STYLES[lp.style]
            if hd is not None and not gather and n % hd == 0:
                heads = n // hd
                if leaf in _KV_NAMES:
                    self._note(parent_name, "kv", heads)
                    if heads % tp == 0:
                        return ColumnParallelLinear(k, n, bias=bias, **common)
                    if tp % heads == 0:
                        return HeadReplicatedColumnLinear(k, hd, heads, bias=bias, **common)
                    raise ValueError(
                        f"{where}: {heads} kv heads can be neither split over nor replicated "
                        f"on TP {tp} (one must divide the other)"
                    )
                if heads % tp:
                    raise ValueError(
                        f"{where}: {heads} heads of size {hd} do not split evenly over TP {tp}"
                    )
                if leaf in _Q_NAMES:
                    self._note(parent_name, "q", heads)
            return ColumnParallelLinear(k, n, bias=bias, gather_output=gather, **common)
        parallel_in = _ROW_STYLES[lp.style]
        if hd is not None and parallel_in and k % hd == 0 and (k // hd) % tp:
            raise ValueError(f"{where}: {k // hd} heads of size {hd} do not split over TP {tp}")
        sp = self.sequence_parallel and parallel_in  # others are refused by hf_sp
        return RowParallelLinear(
            k, n, bias=bias, input_is_parallel=parallel_in, sequence_parallel=sp, **common
        )

    def _note(self, attn: str, kind: str, heads: int) -> None:
        self.attn_local.setdefault(attn, {})[kind] = heads

    def swap(self, name: str, new: ParallelLinearBase, old: nn.Linear) -> None:
        """Load ``old``'s real weights into ``new`` (quantizing them) and put it in place."""
        if old.weight.device.type != "meta":
            tensors = _layer_tensors(
                name, old.weight, old.bias, new.scheme, new.params_dtype, self.calibration
            )
            with torch.no_grad():
                _load_full(new, tensors)
        parent, _, leaf = self._parent(name)
        setattr(parent, leaf, new)

    def fix_attention(self) -> None:
        """Set local head counts on attention modules whose q (and k/v) are head-sharded."""
        tp = self.tp.size
        for attn_name, counts in self.attn_local.items():
            if "q" not in counts:
                continue
            attn = self.modules[attn_name]
            q = counts["q"]
            kv = counts.get("kv", _int_attr(attn, _KV_COUNT_ATTRS) or q)
            q_local = q // tp
            kv_local = kv // tp if kv % tp == 0 else 1
            if q_local % kv_local:
                raise ValueError(
                    f"{attn_name}: {q_local} local q heads are not a multiple of {kv_local} "
                    "local kv heads"
                )
            for attr in _HEAD_COUNT_ATTRS:
                if isinstance(getattr(attn, attr, None), int):
                    setattr(attn, attr, q_local)
            for attr in _KV_COUNT_ATTRS:
                if isinstance(getattr(attn, attr, None), int):
                    setattr(attn, attr, kv_local)
            if isinstance(getattr(attn, "num_key_value_groups", None), int):
                attn.num_key_value_groups = q_local // kv_local


def _shared_param_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def parallelize(
    model: nn.Module,
    tp: TPContext | None = None,
    plan: Mapping[str, str] | None = None,
    quant: QuantSpec = None,
    *,
    calibration: CalibrationSpec = None,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Swap ``model``'s ``nn.Linear`` layers for tensor-parallel ones, in place; returns it.

    tp: the TP context (default ``get_tp()``: the world group, or 1 without torch.distributed);
    every rank must call this on an identical model. plan: None for the model's
    ``config.base_model_tp_plan``, or {module glob: style} (see the module docstring).
    quant: None / FP (float), a Scheme for every planned layer, a dict {module glob: Scheme |
    None} (first match wins) or a callable(name) -> Scheme | None; a dict / callable is also
    asked about ``nn.Linear`` layers outside the plan (not ones sharing weights, e.g. a tied
    lm_head), which become replicated quantized layers when it answers a quantized scheme.
    calibration: for static W8A8 on real weights, {module: ActivationRange | activations
    (rows, k)} or a ``quant.Calibration``.

    A layer whose ``nn.Linear`` has real weights gets them now (quantized per its scheme; each
    rank keeps its shard); one on the meta device becomes a parallel layer on meta, to be
    loaded with ``tp_layers.load_weights`` (``load_pretrained`` does both).

    sequence_parallel: token-sharded hidden states between the decoder layers (norms and
    residual adds on tokens / tp; fused all-gather + matmul and matmul + reduce-scatter), for
    Llama / Qwen2-style decoder models (tp_layers.hf_sp); off at TP 1.
    """
    tp = tp if tp is not None else get_tp()
    resolve, ask_all = _quant_resolver(quant)
    sequence_parallel = bool(sequence_parallel) and tp.size > 1
    swapper = _Swapper(model, tp, resolve, calibration, sequence_parallel)
    plans = resolve_plan(model, plan)
    built: list[tuple[str, ParallelLinearBase, nn.Linear]] = []
    planned: set[str] = set()
    for lp in plans:
        if lp.style in _REPLICATED_STYLES:
            continue
        mod = swapper.modules[lp.name]
        if isinstance(mod, ParallelLinearBase):
            raise ValueError(f"{lp.name}: already parallelized")
        if not isinstance(mod, nn.Linear):
            raise ValueError(
                f"plan entry {lp.key!r} -> {lp.style!r} targets {lp.name} "
                f"({type(mod).__name__}), not an nn.Linear; only nn.Linear layers are swapped"
            )
        built.append((lp.name, swapper.build(lp, mod), mod))
        planned.add(lp.name)
    if ask_all:
        shared = _shared_param_ids(model)
        single = TPContext.single()
        for name, mod in swapper.modules.items():
            if name in planned or type(mod) is not nn.Linear or id(mod.weight) in shared:
                continue
            scheme = resolve(name)
            if scheme is None or not scheme.is_quantized:
                continue
            layer = ColumnParallelLinear(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                quant=scheme,
                tp=single,
                params_dtype=mod.weight.dtype,
                prefix=name,
                device=mod.weight.device,
            )
            built.append((name, layer, mod))
    # Everything is built (and validated) before the model is touched.
    if sequence_parallel:
        from tp_layers.hf_sp import check_sequence_parallel, install_sequence_parallel

        planned_layers = [(n, layer) for n, layer, _ in built if n in planned]
        check_sequence_parallel(model, planned_layers)
    for name, layer, old in built:
        swapper.swap(name, layer, old)
    swapper.fix_attention()
    if sequence_parallel:
        install_sequence_parallel(model, tp, planned_layers)
    return model


# --------------------------------------------------------------------------------------------
# Loading a model directory
# --------------------------------------------------------------------------------------------


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
        if isinstance(owner, ParallelLinearBase):
            raise ValueError(f"{target}: a tied weight cannot be a parallel layer's")
        owner._parameters[attr] = src


def _meta_buffers(mod: nn.Module) -> list[str]:
    return [n for n, b in mod._buffers.items() if b is not None and b.device.type == "meta"]


def _rebuild_buffers(model: nn.Module) -> None:
    """Recompute the buffers a meta-built model lost (rotary ``inv_freq``...): parameter-free
    modules are re-instantiated on CPU from their config; rotary embeddings fall back to the
    model's own ``_init_weights``. Raises RuntimeError naming any buffer left on meta."""
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
        if init is not None and "RotaryEmbedding" in type(mod).__name__:
            for n in names:
                b = mod._buffers[n]
                mod._buffers[n] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
            with torch.no_grad():
                init(mod)
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


def _build_meta(config: transformers.PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _parallel_layers(model: nn.Module) -> Iterator[tuple[str, ParallelLinearBase]]:
    for name, mod in model.named_modules():
        if isinstance(mod, ParallelLinearBase):
            yield name, mod


def load_pretrained(
    model_dir: str | os.PathLike[str],
    tp: TPContext | None = None,
    quant: QuantSpec = None,
    dtype: torch.dtype = torch.bfloat16,
    strict: bool = True,
    *,
    plan: Mapping[str, str] | None = None,
    calibration: CalibrationSpec = None,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Build a causal LM from ``model_dir``'s config.json on the meta device, swap its layers
    (``parallelize``), and load only this rank's shards (``tp_layers.load_weights``).

    Peak memory per rank is about 1 / TP of the sharded weights plus the replicated ones
    (embeddings, norms, lm_head). quant: for an msmodelslim directory (with
    quant_model_description.json) leave it None: every layer gets the scheme its description
    names. For a float directory, a quant spec as for ``parallelize`` quantizes on load (each
    quantized layer's full float weight is read once, quantized, and only this rank's shard
    kept; static W8A8 needs ``calibration``). dtype: the model's float dtype. strict: unexpected
    checkpoint tensors are an error (else a warning). Tied weights (lm_head = embed_tokens)
    are re-tied, and non-persistent buffers (rotary ``inv_freq``) recomputed.
    sequence_parallel: as for ``parallelize``. Returns the
    model in eval mode; its ``tp_load_report`` is the loader's LoadReport.
    """
    path = Path(model_dir)
    config = _read_config(path)
    tp = tp if tp is not None else get_tp()
    quantized_dir = (path / DESCRIPTION_FILE).is_file()
    if quantized_dir:
        if quant is not None:
            raise ValueError(
                f"{path} is an msmodelslim checkpoint ({DESCRIPTION_FILE}); its description sets "
                "every layer's scheme: pass quant=None"
            )
        with CheckpointReader(path) as reader:
            desc_reader = reader

            def from_description(name: str) -> Scheme | None:
                if f"{name}.weight" not in desc_reader:
                    return None
                return desc_reader.layer_scheme(name)

            model = _build_meta(config, dtype)
            parallelize(
                model, tp, plan, quant=from_description, sequence_parallel=sequence_parallel
            )
    else:
        model = _build_meta(config, dtype)
        parallelize(model, tp, plan, quant=quant, sequence_parallel=sequence_parallel)
    tied = _tied_keys(model)
    # Float directory + quantized layers: quantize on load, from the full float weights.
    on_load = (
        {} if quantized_dir else {n: m for n, m in _parallel_layers(model) if m.scheme.is_quantized}
    )
    detached: list[tuple[nn.Module, str, ParallelLinearBase]] = []
    for name, layer in on_load.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        detached.append((parent, leaf, layer))
        setattr(parent, leaf, nn.Identity())
    try:
        if on_load:
            # The detached layers' float tensors are "unexpected" to the loader: check the
            # rest by hand so that strict still means strict.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = load_weights(model, path, strict=False, ignore_missing=list(tied))
            own = {f"{n}.{s}" for n in on_load for s in ("weight", "bias")}
            extra = [u for u in report.unexpected if u not in own]
            if extra and strict:
                raise CheckpointError(
                    f"{path}: unexpected tensors not used by the model: {', '.join(extra[:20])}"
                )
        else:
            report = load_weights(model, path, strict=strict, ignore_missing=list(tied))
        if on_load:
            with CheckpointReader(path) as reader, torch.no_grad():
                for name, layer in on_load.items():
                    if f"{name}.weight" not in reader:
                        raise CheckpointError(f"{path}: missing tensors: {name}.weight")
                    bias = reader.get_tensor(f"{name}.bias") if layer.has_bias else None
                    tensors = _layer_tensors(
                        name,
                        reader.get_tensor(f"{name}.weight").to(dtype),
                        None if bias is None else bias.to(dtype),
                        layer.scheme,
                        dtype,
                        calibration,
                    )
                    _load_full(layer, tensors)
    finally:
        for parent, leaf, layer in detached:
            setattr(parent, leaf, layer)
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
