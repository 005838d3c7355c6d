"""Plans: the parallel-style vocabulary, the model's default plan, and matching a plan against
the model's modules (one LayerPlan per matched module)."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

__all__ = ["LayerPlan", "default_plan", "resolve_plan"]

# style -> gather_output of the ColumnParallelLinear / ParallelLMHead
COLUMN_STYLES = {
    "colwise": False,
    "local_colwise": False,
    "colwise_rep": True,
    "colwise_gather_output": True,
}
# style -> input_is_parallel of the RowParallelLinear
ROW_STYLES = {
    "rowwise": True,
    "local_rowwise": True,
    "rowwise_rep": False,
    "rowwise_split_input": False,
}
PACKED_COLUMN_STYLES = {"packed_colwise", "local_packed_colwise"}
EMBEDDING_STYLES = {"embedding_rowwise"}  # vocab-parallel: VocabParallelEmbedding
REPLICATED_STYLES = {
    "replicate",
    "replicated_with_grad_allreduce",
    "sequence_parallel",
    "gather",
    "local",
    "isolated",
    "embedding_colwise",
}
REFUSED_STYLES = {
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
KNOWN_STYLES = (
    COLUMN_STYLES.keys() | ROW_STYLES.keys() | PACKED_COLUMN_STYLES | EMBEDDING_STYLES
) | REPLICATED_STYLES


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


def base_prefix(model: nn.Module) -> str:
    """``"model."`` for a CausalLM whose base model is ``model.model``; "" for a base model."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + "."
    return ""


def _config_plan(model: nn.Module) -> dict[str, str]:
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


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is target and n), None)


def default_plan(model: nn.Module) -> dict[str, str]:
    """The model's plan with keys relative to ``model`` (HF 5.x ``init_parallel_plans``): the
    config's ``base_model_tp_plan`` under the base-model prefix, the CausalLM's own
    ``_tp_plan`` (``lm_head``), and ``embedding_rowwise`` for an input ``nn.Embedding`` the
    plan does not name."""
    prefix = base_prefix(model)
    plan = {prefix + k: v for k, v in _config_plan(model).items()}
    for key, style in (getattr(type(model), "_tp_plan", None) or {}).items():
        plan.setdefault(key, style)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    name = _module_name(model, emb) if type(emb) is nn.Embedding else None
    if name is not None and not any(_hf_key_regex(k).match(name) for k in plan):
        plan = {name: "embedding_rowwise", **plan}
    return plan


def _check_style(key: str, style: object) -> None:
    if not isinstance(style, str):
        raise TypeError(f"plan entry {key!r}: style must be a str, got {type(style).__name__}")
    if style in REFUSED_STYLES:
        raise ValueError(f"plan entry {key!r} -> {style!r}: {REFUSED_STYLES[style]}")
    if style not in KNOWN_STYLES:
        raise ValueError(
            f"plan entry {key!r} -> {style!r}: unknown style; known: "
            + ", ".join(sorted(KNOWN_STYLES))
        )


def _user_matcher(key: str, prefix: str) -> Callable[[str], bool]:
    """A user key matches a module name relative to the model or to its base model."""

    def match(name: str) -> bool:
        if fnmatch.fnmatchcase(name, key):
            return True
        return (
            bool(prefix)
            and name.startswith(prefix)
            and fnmatch.fnmatchcase(name[len(prefix) :], key)
        )

    return match


def _no_match_hint(model: nn.Module, key: str, prefix: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    generic = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})
    close = difflib.get_close_matches(key, generic, n=3, cutoff=0.5)
    if prefix and not key.startswith(prefix):
        close = [c for c in difflib.get_close_matches(prefix + key, generic, 3, 0.5)] or close
    hint = f"plan entry {key!r} matches no module of {type(model).__name__}"
    hint += " (keys are fnmatch globs of module names, relative to the model"
    hint += f" ('{prefix}layers.*.self_attn.q_proj') or to its base model" if prefix else ""
    hint += ")"
    return hint + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "")


def resolve_plan(model: nn.Module, plan: Mapping[str, str] | None = None) -> list[LayerPlan]:
    """Match a plan against the model's modules.

    plan None: ``default_plan(model)`` (HF keys, ``*`` = one name component); else a dict of
    module-name globs (``fnmatch``) -> style, each key relative to ``model``
    (``model.layers.*.mlp.up_proj``) or to its base model (``layers.*.mlp.up_proj``). Returns
    one LayerPlan per matched module, in module order. Raises ValueError naming the entry for a
    style that is refused or unknown, for a user entry that matches nothing, and for a module
    two entries give different styles.
    """
    user = plan is not None
    entries = dict(plan) if user else default_plan(model)
    prefix = base_prefix(model)
    matchers: list[tuple[str, str, Callable[[str], bool]]] = []
    for key, style in entries.items():
        _check_style(key, style)
        if user:
            matchers.append((key, style, _user_matcher(key, prefix)))
        else:
            rx = _hf_key_regex(key)
            matchers.append((key, style, lambda n, r=rx: r.match(n) is not None))
    out: dict[str, LayerPlan] = {}
    used: set[str] = set()
    for name, _mod in model.named_modules():
        for key, style, match in matchers if name else ():
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
    _check_unused(model, matchers, used, user, prefix)
    return list(out.values())


def _check_unused(model, matchers, used: set[str], user: bool, prefix: str) -> None:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for key, style, match in matchers:
        if key in used:
            continue
        hits = [p for p in params if match(p)]
        if hits and style not in REPLICATED_STYLES:
            raise ValueError(
                f"plan entry {key!r} -> {style!r} targets parameter {hits[0]!r}; only nn.Linear "
                "and nn.Embedding modules can be sharded (bare parameters are not supported)"
            )
        if user and not hits:
            raise ValueError(_no_match_hint(model, key, prefix))
