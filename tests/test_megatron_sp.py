"""Megatron-core adapter with ``sequence_parallel=True``: a tiny GPTModel built with our layers
matches the same model built with Megatron's local spec, both sequence parallel (fp32, CPU,
gloo, TP 2 and 4). The CPU setup is test_megatron's; in addition Megatron's sequence-parallel
collectives allocate their outputs on ``torch.cuda.current_device()``, which is pointed at the
CPU for the duration of the body, and Megatron's torch-norm fallback (no Apex / TE here) refuses
sequence_parallel (its training-time grad all-reduce of the norm weights), so both models use
``_Norm``: the same torch LayerNorm without that check.

Sizes: hidden 256 and ffn 512, so that the column layers (k = 256) and, at TP 2, linear_fc2
(local k = 256) reach the SP kernels' k >= 256 (G3) and take the fused path; linear_proj
(local k = 128) falls back to the separate reduce-scatter.
"""

from __future__ import annotations

import pytest
import test_megatron
import torch
from mp_harness import run_ranks
from test_megatron import (
    ATOL,
    BATCH,
    SEQ,
    VOCAB,
    _CpuMemoryBuffer,
    _gpt,
    _load_with_biases,
    gpt_config,
)

pytestmark = test_megatron.pytestmark  # the megatron marker and skip


def _sp_config(tp: int):
    return gpt_config(tp, hidden_size=256, ffn_hidden_size=512, sequence_parallel=True)


class _Norm:
    """Megatron's WrappedTorchNorm (torch LayerNorm) without its sequence_parallel assert."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_kw):
        norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = True  # as Megatron's fused norms mark them
        return norm


def _with_norm(spec):
    spec.submodules.input_layernorm = _Norm
    spec.submodules.pre_mlp_layernorm = _Norm
    return spec


def _sp_body(rank: int, ws: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import random as mrandom

    import tp_layers as tl
    from tp_layers.megatron import gpt_layer_spec, iter_adapter_layers

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=ws)
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    parallel_state._GLOBAL_MEMORY_BUFFER = _CpuMemoryBuffer()
    from megatron.core.transformer import transformer_block

    current_device, block_norm = torch.cuda.current_device, transformer_block.LayerNormImpl
    torch.cuda.current_device = lambda: "cpu"
    transformer_block.LayerNormImpl = _Norm  # the final layernorm
    try:
        config = _sp_config(ws)
        ref = _gpt(config, _with_norm(get_gpt_layer_local_spec()), seed=4321)
        ours = _gpt(config, _with_norm(gpt_layer_spec()), seed=4321)
        layers = dict(iter_adapter_layers(ours))
        sp_flags = {layer.sequence_parallel for layer in layers.values()}
        row_bias_sp = ours.decoder.layers[0].mlp.linear_fc2.bias.sequence_parallel
        ids, pos, mask = _load_with_biases(ref, ours, seed=7)

        # The decoder's input and output are sequence-sharded [s / tp, b, h], as Megatron's.
        shapes = []
        hook = ours.decoder.layers[0].register_forward_pre_hook(
            lambda _m, args, kwargs: shapes.append(tuple(kwargs["hidden_states"].shape)),
            with_kwargs=True,
        )
        with torch.no_grad():
            want = ref(ids, pos, mask)
            tl.reset_path_counts()
            got = ours(ids, pos, mask)
            paths = {k: v for k, v in tl.path_counts().items() if v}
        hook.remove()
        return {
            "err": (got - want).abs().max().item(),
            "scale": want.abs().max().item(),
            "shape": tuple(got.shape),
            "sp_flags": sp_flags,
            "row_bias_sp": row_bias_sp,
            "decoder_in": shapes[0],
            "paths": paths,
        }
    finally:
        torch.cuda.current_device, transformer_block.LayerNormImpl = current_device, block_norm
        parallel_state.destroy_model_parallel()
        mrandom.initialize_rng_tracker(force_reset=True)


@pytest.mark.parametrize("tp", [2, 4])
def test_gpt_sequence_parallel_matches_megatron_local_spec(tp: int) -> None:
    for r in run_ranks(tp, _sp_body):
        assert r["sp_flags"] == {True} and r["row_bias_sp"] is True, r
        assert r["decoder_in"] == (SEQ // tp, BATCH, 256), r["decoder_in"]
        assert r["shape"] == (BATCH, SEQ, VOCAB // tp)
        assert r["err"] <= ATOL, f"logits differ by {r['err']:.3g} (|logits| {r['scale']:.3g})"
        # per transformer layer: linear_qkv and linear_fc1 fused all-gather; linear_fc2 fused
        # reduce-scatter while its local k (512 / tp) reaches 256, linear_proj (256 / tp) not
        fc2 = "rs_fused" if 512 // tp >= 256 else "rs_unfused"
        want = {"ag_fused": 4}
        want[fc2] = want.get(fc2, 0) + 2
        want["rs_unfused"] = want.get("rs_unfused", 0) + 2
        assert r["paths"] == want, r["paths"]
