"""``parallelize``: swap a model's ``nn.Linear`` / ``nn.Embedding`` layers for tensor-parallel ones
by its plan (quantizing on the way), pad attention heads that do not split (``pad_heads``), tie
a tied lm_head to the sharded embedding, and set the attention modules' local head counts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from quant.schemes import Scheme
from tp_layers.context import TPContext, get_tp
from tp_layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tp_layers.hf import heads as H
from tp_layers.hf.plan import (
    COLUMN_STYLES,
    EMBEDDING_STYLES,
    PACKED_COLUMN_STYLES,
    REPLICATED_STYLES,
    ROW_STYLES,
    LayerPlan,
    resolve_plan,
)
from tp_layers.hf.quantize import CalibrationSpec, QuantSpec, layer_tensors, quant_resolver
from tp_layers.hf.sequence_parallel import check_sequence_parallel, install_sequence_parallel
from tp_layers.linear import (
    ColumnParallelLinear,
    HeadReplicatedColumnLinear,
    MergedColumnParallelLinear,
    ParallelLinearBase,
    RowParallelLinear,
)
from tp_layers.loader import load_layer
from tp_layers.sharding import SourcePadding

__all__ = ["parallelize"]

logger = logging.getLogger(__name__)

Swapped = ParallelLinearBase | VocabParallelEmbedding
_SWAPPED = (ParallelLinearBase, VocabParallelEmbedding)


def _shared_param_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}


class _Swapper:
    """One parallelize call: plans head padding, builds the new layers, swaps them in, and
    fixes attention head counts."""

    def __init__(
        self,
        model: nn.Module,
        tp: TPContext,
        resolve: Callable[[str], Scheme | None],
        ask_all: bool,
        calibration: CalibrationSpec,
        sequence_parallel: bool = False,
    ) -> None:
        self.sequence_parallel = sequence_parallel
        self.model = model
        self.tp = tp
        self.resolve = resolve
        self.ask_all = ask_all
        self.calibration = calibration
        self.modules = dict(model.named_modules())
        self.attn_local: dict[str, dict[str, int]] = {}
        self.pads: dict[str, SourcePadding] = {}  # layer name -> its zero-head padding
        self.embeddings: dict[int, VocabParallelEmbedding] = {}  # id(old weight) -> new
        get_out = getattr(model, "get_output_embeddings", None)
        self.output_embedding = get_out() if callable(get_out) else None

    def _parent(self, name: str) -> tuple[nn.Module, str, str]:
        parent_name, _, leaf = name.rpartition(".")
        return self.modules[parent_name], parent_name, leaf

    # -- head padding ----------------------------------------------------------------------
    def plan_heads(self, plans: list[LayerPlan], pad_heads: bool) -> None:
        """With pad_heads, record zero-head padding for attention whose heads do not split."""
        by_attn: dict[str, dict[str, LayerPlan]] = {}
        for lp in plans:
            parent, parent_name, leaf = self._parent(lp.name)
            if H.head_dim(parent) is None or not isinstance(self.modules[lp.name], nn.Linear):
                continue
            col = lp.style in COLUMN_STYLES and not COLUMN_STYLES[lp.style]
            slot = "o" if ROW_STYLES.get(lp.style) else H.projection_slot(leaf) if col else None
            if slot is not None:
                by_attn.setdefault(parent_name, {})[slot] = lp
        if not pad_heads:
            return
        changed = [self._pad_attention(a, s) for a, s in by_attn.items() if "q" in s]
        changed = [c for c in changed if c is not None]
        if changed:
            self._log_padding(changed)

    def _pad_attention(self, attn_name: str, slots: dict[str, LayerPlan]) -> tuple | None:
        attn = self.modules[attn_name]
        hd = H.head_dim(attn)
        q = self.modules[slots["q"].name]
        heads = q.out_features // hd
        k = self.modules[slots["k"].name] if "k" in slots else None
        kv = k.out_features // hd if k is not None else H.int_attr(attn, H.KV_COUNT_ATTRS) or heads
        if H.splits(heads, kv, self.tp.size):
            return None
        if not {"k", "v", "o"} <= slots.keys():
            raise ValueError(
                f"{attn_name}: pad_heads=True needs separate q / k / v projections and a "
                f"row-parallel output projection in the plan; got {sorted(slots)}"
            )
        new_heads, new_kv = H.padded_head_counts(heads, kv, self.tp.size)
        for slot, stored, padded in (
            ("q", heads, new_heads),
            ("k", kv, new_kv),
            ("v", kv, new_kv),
            ("o", heads, new_heads),
        ):
            self.pads[slots[slot].name] = SourcePadding(int(slot == "o"), stored * hd, padded * hd)
        o = self.modules[slots["o"].name]
        extra = (new_heads - heads) * hd * (q.in_features + o.out_features)
        extra += 2 * (new_kv - kv) * hd * q.in_features
        return heads, kv, new_heads, new_kv, extra

    def _log_padding(self, changed: list[tuple]) -> None:
        heads, kv, new_heads, new_kv, _ = changed[0]
        extra = sum(c[-1] for c in changed)
        total = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "pad_heads: %d attention layers padded from %d q / %d kv heads to %d / %d (zero "
            "heads) for TP %d: +%.2f M weights (+%.1f%% of the model, /TP per rank), attention "
            "projection and score compute +%.0f%% (q/o), +%.0f%% (k/v)",
            len(changed),
            heads,
            kv,
            new_heads,
            new_kv,
            self.tp.size,
            extra / 1e6,
            100 * extra / max(total, 1),
            100 * (new_heads - heads) / heads,
            100 * (new_kv - kv) / kv,
        )

    # -- building --------------------------------------------------------------------------
    def build(self, lp: LayerPlan) -> Swapped | None:
        """The parallel layer replacing module ``lp.name`` (on meta if its weight is); None
        leaves it replicated."""
        mod = self.modules[lp.name]
        if isinstance(mod, _SWAPPED):
            raise ValueError(f"{lp.name}: already parallelized")
        if lp.style in EMBEDDING_STYLES:
            return self._build_embedding(lp, mod)
        if not isinstance(mod, nn.Linear):
            raise ValueError(
                f"plan entry {lp.key!r} -> {lp.style!r} targets {lp.name} "
                f"({type(mod).__name__}), not an nn.Linear; only nn.Linear layers are swapped"
            )
        if mod is self.output_embedding and lp.style in COLUMN_STYLES:
            head = self._build_lm_head(lp, mod)
            if head is not False:
                return head
        return self._build_linear(lp, mod)

    def _common(self, name: str, weight: torch.Tensor) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "params_dtype": weight.dtype,
            "prefix": name,
            "device": weight.device,
        }

    def _build_embedding(self, lp: LayerPlan, emb: nn.Module) -> VocabParallelEmbedding | None:
        if type(emb) is not nn.Embedding or emb.max_norm is not None:
            logger.warning(
                "%s (%s): only a plain nn.Embedding is vocab-sharded; left replicated",
                lp.name,
                type(emb).__name__,
            )
            return None
        new = VocabParallelEmbedding(
            emb.num_embeddings, emb.embedding_dim, **self._common(lp.name, emb.weight)
        )
        self.embeddings[id(emb.weight)] = new
        return new

    def _build_lm_head(self, lp: LayerPlan, head: nn.Linear) -> ParallelLMHead | bool | None:
        """A float ParallelLMHead (tied to the sharded embedding if its weight is); False: a
        quantized lm_head, built as a column-parallel linear."""
        scheme = self.resolve(lp.name) if self.ask_all else None
        if scheme is not None and scheme.is_quantized:
            return False
        tied = id(head.weight) in _shared_param_ids(self.model)
        if tied and id(head.weight) not in self.embeddings:
            logger.warning(
                "%s: its weight is tied to a module that is not vocab-sharded; left replicated",
                lp.name,
            )
            return None
        new = ParallelLMHead(
            head.out_features,
            head.in_features,
            bias=head.bias is not None,
            gather_output=COLUMN_STYLES[lp.style],
            **self._common(lp.name, head.weight),
        )
        return new.tie_weights(self.embeddings[id(head.weight)]) if tied else new

    def _build_linear(self, lp: LayerPlan, linear: nn.Linear) -> ParallelLinearBase:
        parent, parent_name, leaf = self._parent(lp.name)
        common = self._common(lp.name, linear.weight) | {"quant": self.resolve(lp.name)}
        n, k = linear.out_features, linear.in_features
        if lp.name in self.pads:
            pad = common["source_padding"] = self.pads[lp.name]
            n, k = (pad.padded, k) if pad.dim == 0 else (n, pad.padded)
        bias = linear.bias is not None
        where = f"plan entry {lp.key!r} -> {lp.style!r} ({lp.name})"
        hd = H.head_dim(parent)
        tp = self.tp.size
        hint = "; pass pad_heads=True (zero heads, exact) or a plan= that leaves it replicated"
        if lp.style in PACKED_COLUMN_STYLES:
            if n % 2:
                raise ValueError(f"{where}: packed output size {n} is not even")
            return MergedColumnParallelLinear(k, [n // 2, n // 2], bias=bias, **common)
        if lp.style in COLUMN_STYLES:
            gather = COLUMN_STYLES[lp.style]
            if hd is not None and not gather and n % hd == 0:
                heads = n // hd
                if leaf in H.KV_NAMES:
                    self._note(parent_name, "kv", heads)
                    if heads % tp and tp % heads == 0:
                        return HeadReplicatedColumnLinear(k, hd, heads, bias=bias, **common)
                    if heads % tp:
                        raise ValueError(
                            f"{where}: {heads} kv heads can be neither split over nor replicated "
                            f"on TP {tp} (one must divide the other){hint}"
                        )
                if heads % tp:
                    raise ValueError(
                        f"{where}: {heads} heads of size {hd} do not split evenly over TP {tp}"
                        + hint
                    )
                if leaf in H.Q_NAMES:
                    self._note(parent_name, "q", heads)
            return ColumnParallelLinear(k, n, bias=bias, gather_output=gather, **common)
        parallel_in = ROW_STYLES[lp.style]
        if hd is not None and parallel_in and k % hd == 0 and (k // hd) % tp:
            raise ValueError(
                f"{where}: {k // hd} heads of size {hd} do not split over TP {tp}{hint}"
            )
        sp = self.sequence_parallel and parallel_in  # others are refused by hf.sequence_parallel
        return RowParallelLinear(
            k, n, bias=bias, input_is_parallel=parallel_in, sequence_parallel=sp, **common
        )

    def _note(self, attn: str, kind: str, heads: int) -> None:
        self.attn_local.setdefault(attn, {})[kind] = heads

    def replicated_quantized(self, planned: set[str]) -> list[tuple[str, Swapped, nn.Module]]:
        """``nn.Linear`` layers outside the plan that the quant dict / callable quantizes."""
        shared = _shared_param_ids(self.model)
        single = TPContext.single()
        out = []
        for name, mod in self.modules.items():
            if name in planned or type(mod) is not nn.Linear or id(mod.weight) in shared:
                continue
            scheme = self.resolve(name)
            if scheme is None or not scheme.is_quantized:
                continue
            common = self._common(name, mod.weight) | {"tp": single, "quant": scheme}
            layer = ColumnParallelLinear(
                mod.in_features, mod.out_features, bias=mod.bias is not None, **common
            )
            out.append((name, layer, mod))
        return out

    # -- swapping --------------------------------------------------------------------------
    def swap(self, name: str, new: Swapped, old: nn.Module) -> None:
        """Load ``old``'s real weights into ``new`` (quantizing them) and put it in place."""
        if old.weight.device.type != "meta":
            bias = getattr(old, "bias", None)
            scheme = getattr(new, "scheme", None)
            tensors = layer_tensors(
                name, old.weight, bias, scheme, new.params_dtype, self.calibration
            )
            load_layer(new, tensors)  # padded through new.source_padding
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
            kv = counts.get("kv", H.int_attr(attn, H.KV_COUNT_ATTRS) or q)
            q_local, kv_local = H.local_counts(q, kv, tp)
            if q_local % kv_local:
                raise ValueError(
                    f"{attn_name}: {q_local} local q heads are not a multiple of {kv_local} "
                    "local kv heads"
                )
            H.set_local_counts(attn, q_local, kv_local)


def parallelize(
    model: nn.Module,
    tp: TPContext | None = None,
    plan: Mapping[str, str] | None = None,
    quant: QuantSpec = None,
    *,
    calibration: CalibrationSpec = None,
    pad_heads: bool = False,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Swap ``model``'s ``nn.Linear`` / ``nn.Embedding`` layers for tensor-parallel ones, in
    place; returns it.

    tp: the TP context (default ``get_tp()``: the world group, or 1 without torch.distributed);
    every rank must call this on an identical model. plan: None for the model's plan
    (``config.base_model_tp_plan`` + its ``lm_head`` + a vocab-parallel input embedding), or
    {module glob: style}, keys relative to the model or to its base model (see
    ``tp_layers.hf``). quant: None / FP (float), a Scheme for every planned linear layer (the
    lm_head stays float), a dict {module glob: Scheme | None} (first match wins) or a
    callable(name) -> Scheme | None; a dict / callable is also asked about ``nn.Linear``
    layers outside the plan (not ones sharing weights, e.g. a tied lm_head), which become
    replicated quantized layers when it answers a quantized scheme. calibration: for static
    W8A8 on real weights, {module: ActivationRange | activations (rows, k)} or a
    ``quant.Calibration``. pad_heads: pad attention whose q / kv heads do not split over the
    TP size with zero heads (exact; logged with its overhead); default: refused.
    sequence_parallel: token-sharded hidden states between the decoder layers (norms and
    residual adds on tokens / tp; fused all-gather + matmul and matmul + reduce-scatter), for
    Llama / Qwen2-style decoder models (tp_layers.hf.sequence_parallel); off at TP 1.

    A layer whose module has real weights gets them now (quantized per its scheme; each rank
    keeps its shard); one on the meta device becomes a parallel layer on meta, to be loaded
    with ``tp_layers.load_weights`` (``load_pretrained`` does both).
    """
    tp = tp if tp is not None else get_tp()
    resolve, ask_all = quant_resolver(quant)
    sequence_parallel = bool(sequence_parallel) and tp.size > 1
    swapper = _Swapper(model, tp, resolve, ask_all, calibration, sequence_parallel)
    plans = [lp for lp in resolve_plan(model, plan) if lp.style not in REPLICATED_STYLES]
    swapper.plan_heads(plans, pad_heads)
    built = [(lp.name, swapper.build(lp), swapper.modules[lp.name]) for lp in plans]
    built = [b for b in built if b[1] is not None]
    if ask_all:
        built += swapper.replicated_quantized({lp.name for lp in plans})
    # Everything is built (and validated) before the model is touched.
    planned = [(name, layer) for name, layer, _ in built if isinstance(layer, ParallelLinearBase)]
    if sequence_parallel:
        check_sequence_parallel(model, planned)
    for name, layer, old in built:
        swapper.swap(name, layer, old)
    swapper.fix_attention()
    if sequence_parallel:
        install_sequence_parallel(model, tp, planned)
    return model
