"""Sequence parallelism for Hugging Face decoder models (Llama / Qwen2 style), installed by
``tp_layers.parallelize(model, sequence_parallel=True)`` as forward hooks; the model's code is
not changed.

Between the decoder layers the hidden states are token-sharded: ``(b, s, h)`` flattened to
``m = b * s`` token rows, rank r holding its rows ``tl.token_shard(m, tp, r)``
(tp_layers.sequence). So the norms and residual adds of every decoder layer run on m / tp tokens.

- The first decoder layer's input is split (``split_tokens``); the final norm's input is
  gathered back to ``(b, s, h)`` (``gather_tokens``), so the norm, lm_head and the logits are
  as without sequence parallelism.
- Each module holding planned column layers (``self_attn``, ``mlp``) is a region: its entry
  gathers the tokens through its first column layer (``q_proj`` / ``gate_proj``:
  ``forward_sp_entry``, the fused all-gather + matmul in FP prefill), so the attention sees the
  full ``(b, s)`` sequence of its heads and its other column layers take the gathered input.
- The row layers (``o_proj`` / ``down_proj``) are sequence parallel: fused matmul +
  reduce-scatter, each rank getting its token rows back.
- The phase (prefill when s > 1, as ``tp_layers.infer_phase`` decides on the full input) is
  set for the whole forward unless the caller set one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tp_layers.context import TPContext
from tp_layers.linear import ColumnParallelLinear, ParallelLinearBase, RowParallelLinear
from tp_layers.phase import current_phase, infer_phase, phase
from tp_layers.sequence import gather_tokens, split_tokens

__all__ = ["check_sequence_parallel", "install_sequence_parallel"]

_LAYER_LISTS = ("layers", "h", "blocks")
_FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")


class _State:
    """Per-forward facts shared by the hooks of one model: the full shape and the phase."""

    def __init__(self, tp: TPContext) -> None:
        self.tp = tp
        self.shape: tuple[int, ...] = ()
        self.stack = contextlib.ExitStack()

    @property
    def tokens(self) -> int:
        return self.shape[0] * self.shape[1]


def _hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    """The hidden states argument of a module call and a setter returning new (args, kwargs)."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], lambda t: (args, {**kwargs, "hidden_states": t})
    return args[0], lambda t: ((t, *args[1:]), kwargs)


def _find(base: nn.Module, names: Sequence[str], kind: type, what: str) -> Any:
    for n in names:
        m = getattr(base, n, None)
        if isinstance(m, kind):
            return m
    raise ValueError(
        f"sequence_parallel: {type(base).__name__} has no {what} ({' / '.join(names)}); only "
        "Llama / Qwen2-style decoder models are supported"
    )


def _plan(
    model: nn.Module, layers: Sequence[tuple[str, ParallelLinearBase]]
) -> tuple[nn.Module, nn.ModuleList, nn.Module, dict[str, ColumnParallelLinear]]:
    """(base model, decoder layers, final norm, region module name -> its first column layer)."""
    base = getattr(model, "base_model", model)
    blocks = _find(base, _LAYER_LISTS, nn.ModuleList, "decoder layer list")
    norm = _find(base, _FINAL_NORMS, nn.Module, "final norm")
    modules = dict(model.named_modules())
    block_names = tuple(n + "." for n, m in modules.items() if any(m is b for b in blocks))
    regions: dict[str, ColumnParallelLinear] = {}
    for name, layer in layers:
        if not name.startswith(block_names):
            continue
        if isinstance(layer, ColumnParallelLinear) and not layer.gather_output:
            regions.setdefault(name.rpartition(".")[0], layer)  # the region's first column
        elif isinstance(layer, RowParallelLinear) and not layer.sequence_parallel:
            raise ValueError(
                f"sequence_parallel: {name} takes a replicated input (input_is_parallel=False); "
                "a sequence-parallel row layer needs its input sharded by the column layers"
            )
    if not regions or not len(blocks):
        raise ValueError("sequence_parallel: the plan shards no column layers of decoder layers")
    return base, blocks, norm, regions


def check_sequence_parallel(
    model: nn.Module, layers: Sequence[tuple[str, ParallelLinearBase]]
) -> None:
    """Raise ValueError if ``install_sequence_parallel`` cannot serve ``model``."""
    _plan(model, layers)


def install_sequence_parallel(
    model: nn.Module, tp: TPContext, layers: Sequence[tuple[str, ParallelLinearBase]]
) -> None:
    """Install the hooks on ``model`` whose planned layers ``layers`` (name, layer) are swapped
    in (row layers built with sequence_parallel=True)."""
    base, blocks, norm, regions = _plan(model, layers)
    modules = dict(model.named_modules())
    state = _State(tp)

    def split(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
        x, put = _hidden(args, kwargs)
        state.shape = tuple(x.shape)
        state.stack.close()
        if current_phase() is None:
            state.stack.enter_context(phase(infer_phase(x)))
        return put(split_tokens(x.reshape(state.tokens, -1), tp))

    def gather(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
        x, put = _hidden(args, kwargs)
        return put(gather_tokens(x, tp, state.tokens).reshape(*state.shape[:2], -1))

    def enter(first: ColumnParallelLinear):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
            x, put = _hidden(args, kwargs)
            full, _ = first.forward_sp_entry(x, state.tokens)
            return put(full.reshape(*state.shape[:2], -1))

        return hook

    def flatten(_m: nn.Module, args: tuple) -> tuple:
        return (args[0].reshape(-1, args[0].shape[-1]), *args[1:])

    def close(*_a: Any) -> None:
        state.stack.close()

    blocks[0].register_forward_pre_hook(split, with_kwargs=True)
    norm.register_forward_pre_hook(gather, with_kwargs=True)
    norm.register_forward_hook(close)
    base.register_forward_hook(close, always_call=True)
    for parent, first in regions.items():
        modules[parent].register_forward_pre_hook(enter(first), with_kwargs=True)
    for _name, layer in layers:
        if isinstance(layer, RowParallelLinear):
            layer.register_forward_pre_hook(flatten)
