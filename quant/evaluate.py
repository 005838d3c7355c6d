"""Windowed perplexity of a causal LM: the accuracy measure of a quantized checkpoint.

``evaluate_perplexity(model_dir_or_module, text)`` tokenizes ``text`` once, cuts the ids into
windows of ``window`` tokens starting every ``stride`` tokens (default: non-overlapping), runs
each window alone (batch 1, no padding) and scores, in each window, only the targets no
earlier window scored (the first ``window - stride`` positions of an overlapping window are
context only). Target ``t`` is predicted from positions ``< t`` of its window; the first token
of the text is never a target. ``ppl = exp(sum NLL / number of scored targets)``, NLL in
float32 from the model's logits: the Hugging Face "perplexity of fixed-length models" recipe.
Each window is preceded by ``prefix`` token ids, context only (default for a text: the tokens
the tokenizer puts before any text, ``special_prefix``: Gemma's ``<bos>``, nothing for
SmolLM2), so a model that expects a BOS sees one in every window.

A model directory is loaded by ``load_model`` in one process: the transformers model of its
config.json with every quantized linear replaced by ``quant.QuantLinear`` (the same per-scheme
formula the tensor-parallel layers run, ``Scheme.linear``). To evaluate at another TP size,
pass the loaded parallel model as a module.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.calibration import special_prefix
from quant.checkpoint import CheckpointReader
from quant.modules import QuantLinear
from quant.schemes import FP

__all__ = [
    "Perplexity",
    "compare_perplexity",
    "evaluate_perplexity",
    "format_comparison",
    "load_model",
    "load_text",
    "special_prefix",
    "window_spans",
]

log = logging.getLogger(__name__)


@dataclass
class Perplexity:
    """Result of ``evaluate_perplexity``: ``ppl = exp(nll / tokens)``."""

    ppl: float
    nll: float  # summed negative log-likelihood (nats) of the scored targets
    tokens: int  # number of scored targets
    windows: int


def load_text(path: str | os.PathLike[str]) -> str:
    """UTF-8 text of ``path`` (FileNotFoundError / ValueError naming the file)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"eval text file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"eval text file {p}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise ValueError(f"eval text file {p} is empty")
    return text


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window over ``n_tokens`` ids: the window feeds ids
    ``[begin, end)`` and scores targets ``[first_target, end)`` (each target once overall)."""
    if window < 2:
        raise ValueError(f"window: must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride: must be in [1, window={window}], got {stride}")
    spans: list[tuple[int, int, int]] = []
    scored_to = 1  # targets below this are scored (target 0 has no context)
    begin = 0
    while True:
        end = min(begin + window, n_tokens)
        first = max(scored_to, begin + 1)
        if first < end:
            spans.append((begin, end, first))
            scored_to = end
        if end >= n_tokens:
            return spans
        begin += stride


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out: Any = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(
            "model: must return logits (1, seq, vocab) (or an output with .logits) for "
            f"input_ids {list(ids.shape)}"
        )
    return logits


def _float_state(reader: CheckpointReader, model: nn.Module, dtype: torch.dtype) -> None:
    """Copy every persistent float tensor of ``model`` from ``reader`` (cast to ``dtype``). A
    tensor absent from the checkpoint is allowed only if tied to one that is present (lm_head
    = embed_tokens); raises ValueError naming the directory and tensors otherwise."""
    own = model.state_dict(keep_vars=True)
    held = {  # QuantLinear buffers: already the checkpoint's tensors
        f"{m_name}.{b}"
        for m_name, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for b in m._buffers
    }
    state, absent = {}, []
    for name in own:
        if name in held:
            continue
        if name in reader:
            v = reader.get_tensor(name)
            state[name] = v.to(dtype) if v.is_floating_point() else v
        else:
            absent.append(name)
    loaded = {own[n].data_ptr() for n in state}
    untied = [n for n in absent if own[n].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"{reader.path}: missing tensors: {', '.join(untied[:20])}")
    model.load_state_dict(state, strict=False)
    unused = sorted(set(reader.names()) - set(own))
    if unused:
        log.warning("%s: %d tensor(s) not used: %s", reader.path, len(unused), unused[:8])


def _swap_quantized(reader: CheckpointReader, model: nn.Module) -> int:
    """Replace each ``nn.Linear`` whose weight the checkpoint describes as quantized by a
    ``QuantLinear`` holding that layer's checkpoint tensors; returns how many."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        weight = f"{name}.weight"
        if not isinstance(mod, nn.Linear) or weight not in reader:
            continue
        scheme = reader.layer_scheme(name)
        if isinstance(scheme, FP):
            continue
        reader.validate_layer(name)
        n, k = reader.info(weight).shape
        if (n, k) != (mod.out_features, mod.in_features):
            raise ValueError(
                f"{reader.path}: {weight} is {[n, k]}, the model's layer is "
                f"[{mod.out_features}, {mod.in_features}]"
            )
        has_bias = f"{name}.bias" in reader
        tensors = {
            s: reader.get_tensor(f"{name}.{s}")
            for s in scheme.spec_map(n, k, has_bias, torch.bfloat16)
            if f"{name}.{s}" in reader
        }
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model, child, QuantLinear(scheme, tensors)
        )
        swapped += 1
    return swapped


def load_model(model_dir: str | os.PathLike[str], dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers causal LM (eval mode) from a float or msmodelslim model directory, on
    CPU in one process: the architecture from its config.json, every float tensor cast to
    ``dtype`` (default bfloat16), every linear the description names quantized replaced by a
    ``quant.QuantLinear`` with its checkpoint tensors (the scheme's formula, ``Scheme.linear``).
    Raises FileNotFoundError / ValueError naming the directory or tensor."""
    import transformers

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a model directory)")
    dt = dtype or torch.bfloat16
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    with CheckpointReader(path) as reader:
        with _no_init():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dt)
        model.tie_weights()  # lm_head = embed_tokens where the config ties them
        swapped = _swap_quantized(reader, model)
        _float_state(reader, model, dt)
    log.info("%s: %d quantized linear(s) as QuantLinear", path, swapped)
    return model.eval()


def _no_init() -> Any:
    """Skip random init of weights that are loaded right after (a no-op if transformers has
    no such context)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def _tokenize(
    text: str | Sequence[int] | torch.Tensor, tokenizer: Any, where: Path | None
) -> tuple[torch.Tensor, list[int]]:
    """(ids (n,) long, default prefix): token ids are taken as given, with no prefix."""
    if isinstance(text, torch.Tensor) or (not isinstance(text, str) and text is not None):
        return torch.as_tensor(text).reshape(-1).long(), []
    if tokenizer is None:
        if where is None:
            raise ValueError("tokenizer: needed to evaluate a text on a module")
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return ids.reshape(-1).long(), special_prefix(tokenizer)


def evaluate_perplexity(
    model_dir_or_module: str | os.PathLike[str] | nn.Module,
    text: str | Sequence[int] | torch.Tensor,
    *,
    window: int = 512,
    stride: int | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    max_windows: int | None = None,
    prefix: Sequence[int] | None = None,
) -> Perplexity:
    """Perplexity of a causal LM on ``text`` (a string, or token ids (n,)), in windows.

    model_dir_or_module: a model directory (float or msmodelslim; loaded by ``load_model`` in
    ``dtype``, default bfloat16) or a module (e.g. a tensor-parallel model) called as ``model(input_ids=(1, s) long)`` returning logits (1, s, vocab) or
    an output with ``.logits``. tokenizer: anything called as ``tokenizer(text,
    return_tensors="pt")`` (default: the model directory's). window / stride: tokens per window
    and between window starts (default stride = window). max_windows: evaluate only the first
    windows (cheap smoke runs). prefix: token ids before every window, never scored
    (default: ``special_prefix(tokenizer)`` for a text, none for token ids). See the module
    docstring for what is scored.
    """
    stride = window if stride is None else stride
    where = None
    if isinstance(model_dir_or_module, nn.Module):
        model = model_dir_or_module
    else:
        where = Path(model_dir_or_module)
        if not where.is_dir():
            raise FileNotFoundError(f"model directory not found: {where}")
        model = load_model(where, dtype)
    ids, auto_prefix = _tokenize(text, tokenizer, where)
    pre = torch.as_tensor(auto_prefix if prefix is None else list(prefix), dtype=torch.long)
    p = pre.numel()
    spans = window_spans(ids.numel(), window, stride)
    if max_windows is not None:
        spans = spans[: max(1, max_windows)]
    if not spans:
        raise ValueError(f"text: {ids.numel()} token(s), nothing to score (need >= 2)")
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for begin, end, first in spans:
                x = torch.cat([pre, ids[begin:end]]).unsqueeze(0)
                logits = _logits(model, x)[0].to(torch.float32)
                pred = logits[p + first - 1 - begin : p + end - 1 - begin]  # targets first..end
                lp = torch.log_softmax(pred, dim=-1)
                tgt = ids[first:end]
                nll -= float(lp.gather(1, tgt.unsqueeze(1)).sum())
                count += end - first
    finally:
        model.train(was_training)
    ppl = math.exp(nll / count)
    log.info("perplexity %.4f over %d tokens in %d windows", ppl, count, len(spans))
    return Perplexity(ppl=ppl, nll=nll, tokens=count, windows=len(spans))


def compare_perplexity(
    float_dir: str | os.PathLike[str],
    quant_dir: str | os.PathLike[str],
    text: str,
    *,
    window: int = 512,
    max_windows: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Perplexity, Perplexity]:
    """(float, quantized) perplexity of two model directories on the same ``text``, both
    loaded by ``load_model`` in ``dtype`` (default bfloat16) and tokenized
    with the float directory's tokenizer."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(float_dir), local_files_only=True)
    kw = {"window": window, "max_windows": max_windows, "dtype": dtype, "tokenizer": tok}
    return evaluate_perplexity(float_dir, text, **kw), evaluate_perplexity(quant_dir, text, **kw)


def format_comparison(fp: Perplexity, q: Perplexity, scheme: str) -> str:
    """One line: float ppl, quantized ppl and their ratio."""
    return (
        f"perplexity ({fp.tokens} tokens, {fp.windows} windows): float {fp.ppl:.4f}, "
        f"{scheme} {q.ppl:.4f}, ratio {q.ppl / fp.ppl:.4f} ({100 * (q.ppl / fp.ppl - 1):+.2f}%)"
    )


def run_eval(args: Any, scheme: str, dtype: torch.dtype | None) -> int:
    """``python -m quant ... --eval TEXT_FILE``: print the comparison line; exit code."""
    import sys

    try:
        text = load_text(args.eval)
        fp, q = compare_perplexity(
            args.model,
            args.out,
            text,
            window=args.eval_window,
            max_windows=args.eval_max_windows,
            dtype=dtype if dtype in (torch.bfloat16, torch.float16) else None,
        )
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: --eval: {e}", file=sys.stderr)
        return 2
    print(format_comparison(fp, q, scheme))
    return 0
