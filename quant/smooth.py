"""SmoothQuant-style outlier smoothing for static W8A8 (msmodelslim's "anti-outlier").

A few input channels of an LLM's linear layers carry activations far larger than the rest, so
one per-tensor activation scale wastes most of int8's range on them. Smoothing moves that range
into the weights with an exact re-parameterisation of the float model: for a norm whose output
``X`` (rows, k) feeds the linears ``W_1 .. W_m`` (each (n_i, k)),

    s_j = max|X_:,j| ** alpha / max_i max|W_i[:, j]| ** (1 - alpha)     (j = 0 .. k-1)
    norm.weight /= s,  norm.bias /= s,  W_i[:, j] *= s_j

so ``(X / s) @ (W_i * s)^T == X @ W_i^T``; quantization then sees the flatter ``X / s``. The
modified norm weights are written as FLOAT tensors (what msmodelslim's anti-outlier does), so
loaders need no change. Linears whose input is produced linearly by another linear are
smoothed through that producer's output rows instead: gated MLPs' ``down_proj`` through
``up_proj`` and the attention's ``o_proj`` through ``v_proj`` (one factor per kv channel,
shared by the query heads reading it: ``DownSmoothGroup.factors``). ``alpha`` is either given
or searched per group (``search_alpha``: least quantized output error on the calib data).

Which norm feeds which linears is an architecture fact, not something tensor names can prove
(OLMo2's and Gemma 2/3's ``post_attention_layernorm`` is applied *after* the attention, Gemma's
norms multiply by ``1 + weight``): ``SMOOTH_ARCHITECTURES`` lists, per ``config.json``
``model_type``, the pre-norm decoder layouts known to be ``y = x_hat * (offset + weight)
(+ bias)`` followed by the linears; within such a model the groups are discovered from the
tensor names (``<prefix>.<N>.input_layernorm`` -> ``self_attn.{q,k,v}_proj`` or fused
``qkv_proj``, ``post_attention_layernorm`` (Gemma 2/3: ``pre_feedforward_layernorm``) ->
``mlp.{gate,up}_proj`` / ``gate_up_proj`` / ``c_fc``). A norm with ``offset`` 1 (Gemma) stores
``(1 + weight) / s - 1``. Norms after a linear (Gemma's post-attention / post-feed-forward
norms, Qwen3's and Gemma 3's q/k norms, which normalize each head of q_proj's / k_proj's
output) are never folded into: the first two sit after o_proj / down_proj and are scale
invariant, the q/k norms see the unchanged q / k of smoothed q_proj / k_proj. Any other
``model_type`` is refused when smoothing is requested.

Calibration is collected on the ORIGINAL model; a group's per-channel ``max|X_j|`` is taken
over the recorded inputs of its linears (identical inputs, so any one suffices), and the
per-tensor static range of each smoothed linear (``down_proj`` included) is then observed on
``X / s`` (the input it will actually see), not derived from the unsmoothed range.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from quant.algorithms import quantize_linear
from quant.modules import QuantLinear
from quant.schemes import W8A8, Scheme

__all__ = [
    "ALPHA_GRID",
    "DOWN_SMOOTH_ARCHITECTURES",
    "O_SMOOTH_ARCHITECTURES",
    "SMOOTH_ARCHITECTURES",
    "DownSmoothGroup",
    "SmoothGroup",
    "apply_smoothing",
    "find_down_smooth_groups",
    "find_smooth_groups",
    "quantized_output_error",
    "scale_up_rows",
    "search_alpha",
    "smooth_scales",
]


@dataclass(frozen=True)
class _Rule:
    """One norm -> linears pattern inside a decoder layer (names relative to the layer)."""

    norm: str
    alternatives: tuple[tuple[str, ...], ...]  # the first set fully present is used
    offset: float = 0.0  # the norm computes x_hat * (offset + weight)


_ATTN = _Rule(
    "input_layernorm",
    (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.qkv_proj",),
    ),
)
_MLP = _Rule(
    "post_attention_layernorm",
    (("mlp.gate_proj", "mlp.up_proj"), ("mlp.gate_up_proj",), ("mlp.c_fc",)),
)

# GemmaRMSNorm / Gemma2RMSNorm / Gemma3RMSNorm: x_hat.float() * (1.0 + weight.float())
_GEMMA_ATTN = _Rule(_ATTN.norm, _ATTN.alternatives[:1], offset=1.0)
# Gemma 2/3 layer: post_attention_layernorm(self_attn(input_layernorm(x))) + x, then
# post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))) + h
_GEMMA2_MLP = _Rule("pre_feedforward_layernorm", _MLP.alternatives[:1], offset=1.0)

#: config.json ``model_type`` -> norm/linear rules of its (pre-norm) decoder layer. Only
#: architectures whose norms compute ``x_hat * (offset + weight) (+ bias)`` and feed exactly
#: these linears belong here (verified against transformers' modeling code by
#: tests/test_quant_smooth.py).
SMOOTH_ARCHITECTURES: dict[str, tuple[_Rule, ...]] = {
    "llama": (_ATTN, _MLP),
    "mistral": (_ATTN, _MLP),
    "qwen2": (_ATTN, _MLP),
    "qwen3": (_ATTN, _MLP),
    "phi3": (_ATTN, _MLP),
    "starcoder2": (_ATTN, _MLP),
    "gemma": (_GEMMA_ATTN, _Rule(_MLP.norm, _MLP.alternatives[:1], offset=1.0)),
    "gemma2": (_GEMMA_ATTN, _GEMMA2_MLP),
    "gemma3_text": (_GEMMA_ATTN, _GEMMA2_MLP),
}


@dataclass(frozen=True)
class _DownRule:
    """``up`` (names relative to the layer) produces, elementwise-multiplied by something
    independent of it, the input of ``down``. ``up_half``: ``up`` is a fused gate/up linear
    whose output's SECOND half is the up part (``gate, up = y.chunk(2, dim=-1)``)."""

    up: str
    down: str
    up_half: bool = False


_GATED = _DownRule("mlp.up_proj", "mlp.down_proj")

#: config.json ``model_type`` -> the gated-MLP up -> down pair whose inner channels can be
#: smoothed (``down_proj(act(gate_proj(x)) * up_proj(x))``, checked against transformers'
#: modeling code by tests/test_quant_smooth.py). starcoder2 is deliberately absent: its
#: ``c_proj(act(c_fc(x)))`` has no gate, and ``act`` is not linear in ``c_fc``'s output.
DOWN_SMOOTH_ARCHITECTURES: dict[str, _DownRule] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    # GemmaMLP / Gemma2MLP / Gemma3MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1); down_proj(up * act(gate))
    "phi3": _DownRule("mlp.gate_up_proj", "mlp.down_proj", up_half=True),
}


#: config.json ``model_type`` -> the attention's v -> o pair: o_proj's input channel
#: ``h * head_dim + d`` is ``sum_t p[h, t] * V_t[h // (heads / kv_heads), d]`` (softmax
#: weights times v_proj's output; HF ``repeat_kv`` repeats each kv head for consecutive query
#: heads), linear in v_proj's row ``g * head_dim + d``: dividing that row (and its bias) by
#: ``s[g, d]`` and multiplying o_proj's columns of every query head of kv head g by it is
#: exact. Only separate ``v_proj`` layouts (phi3's fused qkv_proj is not listed). Gemma 3's
#: q/k norms and Gemma 2's logit soft-capping act on q and k only, not on v.
O_SMOOTH_ARCHITECTURES: dict[str, _DownRule] = {
    t: _DownRule("self_attn.v_proj", "self_attn.o_proj")
    for t in ("llama", "mistral", "qwen2", "qwen3", "starcoder2", "gemma", "gemma2", "gemma3_text")
}


@dataclass(frozen=True)
class DownSmoothGroup:
    """A linear ``up`` whose output channels (all rows, or with ``up_half`` the second half of
    its rows) scale ``down``'s input channels (module names): one to one, or with ``heads``
    = (query heads, kv heads, head_dim) through the GQA map of an attention (v -> o)."""

    up: str
    down: str
    up_half: bool = False
    heads: tuple[int, int, int] | None = None

    def factors(
        self, act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(row divisors of ``up``, column factors of ``down``) from down's per-input-channel
        maxima (k_down,); with ``heads`` the factor of a kv channel is shared by the query
        heads reading it (maxima taken over them)."""
        if self.heads is None:
            s = smooth_scales(act_absmax, weight_absmax, alpha)
            return s, s
        h, kv, hd = self.heads
        rep = h // kv
        a = act_absmax.reshape(kv, rep, hd).amax(dim=1).reshape(-1)
        w = weight_absmax.reshape(kv, rep, hd).amax(dim=1).reshape(-1)
        s = smooth_scales(a, w, alpha)
        return s, s.reshape(kv, 1, hd).expand(kv, rep, hd).reshape(-1)


@dataclass(frozen=True)
class SmoothGroup:
    """A norm (module name, e.g. ``model.layers.3.input_layernorm``) and the linear modules
    that all consume its output; the norm computes ``x_hat * (offset + weight)``."""

    norm: str
    linears: tuple[str, ...]
    offset: float = 0.0


def find_smooth_groups(model_type: str | None, names: Iterable[str]) -> list[SmoothGroup]:
    """The norm -> linears groups of a checkpoint with tensor ``names`` of architecture
    ``model_type``. Raises ValueError for an unknown architecture, or when a norm of the
    known layout is present but its linears are not (an unexpected variant)."""
    rules = SMOOTH_ARCHITECTURES.get(model_type or "")
    if rules is None:
        raise ValueError(
            f"smoothing: unsupported architecture model_type={model_type!r} (known: "
            + ", ".join(sorted(SMOOTH_ARCHITECTURES))
            + "); its norm -> linear structure is not known, so it cannot be smoothed"
        )
    present = {n[: -len(".weight")] for n in names if n.endswith(".weight")}
    groups: list[SmoothGroup] = []
    errors: list[str] = []
    for rule in rules:
        pat = re.compile(r"^(.*\.)" + re.escape(rule.norm) + "$")
        for mod in sorted(present, key=_natural):
            m = pat.match(mod)
            if m is None:
                continue
            prefix = m.group(1)
            for alt in rule.alternatives:
                lin = tuple(prefix + a for a in alt)
                if all(x in present for x in lin):
                    groups.append(SmoothGroup(mod, lin, rule.offset))
                    break
            else:
                errors.append(
                    f"{mod}: none of "
                    + " | ".join("+".join(alt) for alt in rule.alternatives)
                    + f" found under {prefix!r}"
                )
    if errors:
        raise ValueError(
            f"smoothing: unexpected {model_type} layout:\n  " + "\n  ".join(errors[:6])
        )
    if not groups:
        raise ValueError(f"smoothing: no norm -> linear groups found in this {model_type} model")
    return groups


def find_down_smooth_groups(
    model_type: str | None,
    names: Iterable[str],
    heads: tuple[int, int, int] | None = None,
) -> list[DownSmoothGroup]:
    """The gated-MLP up -> down pairs of a checkpoint (empty for architectures without one in
    ``DOWN_SMOOTH_ARCHITECTURES``) and, with ``heads`` (query heads, kv heads, head_dim), the
    attention v -> o pairs (``O_SMOOTH_ARCHITECTURES``). Raises ValueError when one of a pair
    is present without the other (an unexpected variant)."""
    names = list(names)
    out = _find_pairs(DOWN_SMOOTH_ARCHITECTURES.get(model_type or ""), model_type, names, None)
    o_rule = O_SMOOTH_ARCHITECTURES.get(model_type or "")
    if heads is not None and o_rule is not None:
        out += _find_pairs(o_rule, model_type, names, heads)
    return out


def _find_pairs(
    rule: _DownRule | None,
    model_type: str | None,
    names: list[str],
    heads: tuple[int, int, int] | None,
) -> list[DownSmoothGroup]:
    if rule is None:
        return []
    present = {n[: -len(".weight")] for n in names if n.endswith(".weight")}
    groups: list[DownSmoothGroup] = []
    errors: list[str] = []
    prefixes: set[str] = set()
    for name in (rule.up, rule.down):
        pat = re.compile(r"^(.*\.)" + re.escape(name) + "$")
        prefixes.update(m.group(1) for m in map(pat.match, present) if m is not None)
    for prefix in sorted(prefixes, key=_natural):
        up, down = prefix + rule.up, prefix + rule.down
        if up in present and down in present:
            groups.append(DownSmoothGroup(up, down, rule.up_half, heads))
        else:
            errors.append(f"{prefix}: {rule.up} and {rule.down} not both present")
    if errors:
        raise ValueError(
            f"smoothing: unexpected {model_type} MLP layout:\n  " + "\n  ".join(errors[:6])
        )
    return groups


def _natural(s: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def smooth_scales(
    act_absmax: torch.Tensor,
    weight_absmax: torch.Tensor,
    alpha: float = 0.5,
    *,
    eps: float = 1e-5,
    limit: float = 1e4,
) -> torch.Tensor:
    """Per-input-channel factors ``s = act_absmax**alpha / weight_absmax**(1-alpha)`` (k,)
    float32, both maxima clamped to ``>= eps``, ``s`` clamped to ``[1/limit, limit]``; a
    channel where either maximum is 0 (never active / all-zero column) gets ``s = 1``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha: must be in [0, 1], got {alpha}")
    a = act_absmax.to(torch.float32)
    w = weight_absmax.to(torch.float32)
    if a.shape != w.shape or a.dim() != 1:
        raise ValueError(f"smoothing: activation {list(a.shape)} / weight {list(w.shape)} maxima")
    s = a.clamp_min(eps).pow(alpha) / w.clamp_min(eps).pow(1.0 - alpha)
    s = s.clamp(1.0 / limit, limit)
    return torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))


def apply_smoothing(
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    scales: torch.Tensor,
    out_dtype: torch.dtype,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Divide a norm's multiplier ``m = offset + weight`` (and its bias) by ``scales`` (k,) and
    store the weight ``m / s - offset`` in ``out_dtype``. Returns (weight, bias, effective
    scales): the factors the linears' columns must be multiplied by so that the *stored* norm
    times the linear equals the original exactly (``m / stored m`` where both are non-zero,
    which also absorbs the bf16/fp16 rounding of the stored norm; ``scales`` elsewhere, and
    always when the norm has a bias). A channel whose stored multiplier would round to 0
    (``m / s`` below the dtype's resolution around ``-offset``) gets the representable one
    nearest to 0 of ``m``'s sign instead (its factor then stays below ``s``)."""
    m = norm_weight.to(torch.float32) + offset
    s = scales.to(torch.float32)
    new_w = (m / s - offset).to(out_dtype)
    stored = new_w.to(torch.float32) + offset
    lost = (stored == 0) & (m != 0)
    if bool(lost.any()):
        toward = torch.where(m > 0, torch.inf, -torch.inf).to(out_dtype)
        new_w = torch.where(lost, torch.nextafter(new_w, toward), new_w)
        stored = new_w.to(torch.float32) + offset
    new_b = None if norm_bias is None else (norm_bias.to(torch.float32) / s).to(out_dtype)
    eff = s
    if norm_bias is None:
        ok = (m != 0) & (stored != 0)
        eff = torch.where(ok, m / torch.where(ok, stored, torch.ones_like(stored)), s)
    return new_w, new_b, eff


def group_act_absmax(
    group: SmoothGroup, activations: Mapping[str, torch.Tensor]
) -> torch.Tensor | None:
    """Per-channel ``max|X|`` (k,) over the recorded inputs of the group's linears (None if
    none of them has recorded activations)."""
    out = None
    for lin in group.linears:
        x = activations.get(lin)
        if x is None or x.numel() == 0:
            continue
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).to(torch.float32)
        out = m if out is None else torch.maximum(out, m)
    return out


def scale_up_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor, up_half: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Divide the output rows of ``up`` (weight (n, k), bias (n,)) by ``scales`` (float32
    results); with ``up_half`` only the second half of the rows (a fused gate/up linear)."""
    w = weight.to(torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    s = scales.to(torch.float32)
    n = w.shape[0]
    first = n - s.numel() if up_half else 0
    if (up_half and n != 2 * s.numel()) or (not up_half and n != s.numel()):
        raise ValueError(f"smoothing: {s.numel()} down_proj factors for an up linear of {n} rows")
    w = w.clone()
    w[first:] /= s[:, None]
    if b is not None:
        b = b.clone()
        b[first:] /= s
    return w, b


#: alphas tried by the per-group search (``smooth="auto"``)
ALPHA_GRID: tuple[float, ...] = tuple(i / 10 for i in range(11))


def quantized_output_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    scheme: Scheme,
    *,
    observer: str = "minmax",
    percentile: float = 99.99,
    dtype: torch.dtype = torch.bfloat16,
) -> float:
    """``||y_q - target||^2`` of one linear quantized with ``scheme`` (``quant.QuantLinear``,
    the same formula as the deployed layers) on inputs x (rows, k); weight (n, k); target
    (rows, n) float32; static W8A8 ranges are observed on x with ``observer``."""
    from quant.calibration import make_observer

    act_range = None
    if isinstance(scheme, W8A8) and not scheme.dynamic:
        obs = make_observer(observer, percentile)
        obs.update(x)
        act_range = obs.range()
    tensors = quantize_linear(weight, None, scheme, model_dtype=dtype, act_range=act_range)
    y = QuantLinear(scheme, tensors)(x.to(dtype)).to(torch.float32)
    return float((y - target).square().sum())


def search_alpha(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    scheme: Scheme,
    *,
    act_absmax: torch.Tensor | None = None,
    observer: str = "minmax",
    percentile: float = 99.99,
    alphas: Sequence[float] = ALPHA_GRID,
    max_rows: int = 512,
    factors: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
) -> tuple[float, dict[float, float]]:
    """The smoothing alpha (msmodelslim's "flex smooth") minimizing the quantized output error
    of the linears ``weights`` (each (n_i, k)) that share the input x (rows, k): for each
    alpha, s = smooth_scales(max|X|, max_i max|W_i|, alpha) and the error is
    ``sum_i ||Q(X / s) Q(W_i * s)^T - X W_i^T||^2 / ||X W_i^T||^2``. Returns (best alpha,
    alpha -> error). act_absmax: per-channel max|X| over all calib rows (default x's).
    factors: (max|X|, max|W|, alpha) -> s (k,) instead of ``smooth_scales`` (tied channels)."""
    factors = factors or smooth_scales
    xs = x[:max_rows].to(torch.float32)
    a_max = xs.abs().amax(dim=0) if act_absmax is None else act_absmax.to(torch.float32)
    ws = [w.to(torch.float32) for w in weights]
    w_max = torch.stack([w.abs().amax(dim=0) for w in ws]).amax(dim=0)
    targets = [xs @ w.t() for w in ws]
    norms = [float(t.square().sum()) or 1.0 for t in targets]
    errs: dict[float, float] = {}
    for a in alphas:
        s = factors(a_max, w_max, a)
        errs[a] = sum(
            quantized_output_error(
                xs / s, w * s, t, scheme, observer=observer, percentile=percentile
            )
            / nrm
            for w, t, nrm in zip(ws, targets, norms, strict=True)
        )
    best = min(errs, key=errs.__getitem__)
    return best, errs
