"""A Megatron-core GPT with our layers in its linear slots, on CPU ranks, against the same model
built with Megatron's local spec (same seed, same weights).

    torchrun --nproc-per-node 2 examples/megatron_gpt.py           # TP 2, fp32, gloo
    torchrun --nproc-per-node 2 examples/megatron_gpt.py --bf16    # Float16Module (bf16)
    python examples/megatron_gpt.py                                 # TP 1

Megatron assumes CUDA in a few places; on CPU this example (and tests/test_megatron.py, which
imports its helpers) works around them:

- ``use_cpu_initialization=True``: every weight is drawn from the default torch CPU generator,
  so ``torch.manual_seed`` seeds it;
- the inference RNG tracker (``initialize_rng_tracker(inference_rng_tracker=True)``): the CUDA
  tracker forked around attention dropout is replaced by one whose ``fork`` is a no-op;
- a CPU global memory buffer (``parallel_state._GLOBAL_MEMORY_BUFFER``): Megatron's allocates
  the attention-score buffer on ``torch.cuda.current_device()``;
- an explicit causal mask: Megatron's default one is built on "cuda";
- learned absolute position embeddings: RoPE moves its frequencies to the CUDA device;
- bf16 through Megatron's ``Float16Module`` (``config.bf16=True``), which casts the inputs and
  returns fp32 logits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class CpuMemoryBuffer:
    """Stands in for Megatron's global memory buffer: the attention scores buffer (used with
    beta=0) is allocated on the CPU."""

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None) -> torch.Tensor:
        return torch.empty(tensor_shape, dtype=dtype)


@contextlib.contextmanager
def cpu_model_parallel(tp: int) -> Iterator[None]:
    """Megatron's parallel state for TP ``tp`` on the initialised (gloo) world, CPU-ready;
    torn down on exit."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    parallel_state._GLOBAL_MEMORY_BUFFER = CpuMemoryBuffer()  # reset by destroy_model_parallel
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        mrandom.initialize_rng_tracker(force_reset=True)


def gpt_config(tp: int, bf16: bool = False, **over):
    """A small GQA GPT config (2 layers, hidden 64, 4 heads / 2 groups, gated MLP) for CPU."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        add_bias_linear=True,
        gated_linear_unit=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
    )
    kw.update(over)
    return TransformerConfig(**kw)


def build_gpt(config, spec, vocab_size: int, max_seq: int, seed: int) -> torch.nn.Module:
    """GPTModel (eval) with learned absolute positions, seeded on the CPU generator."""
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_seq,
        position_embedding_type="learned_absolute",
    ).eval()


def causal_mask(seq: int) -> torch.Tensor:
    """(1, 1, seq, seq) bool, True = masked."""
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids: (b, s) -> (b, s, vocab): a full causal forward (positions 0..s-1)."""
    s = ids.shape[1]
    return model(ids, torch.arange(s).unsqueeze(0).expand_as(ids), causal_mask(s))


def greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """ids: (b, s) -> (b, s + new_tokens), re-running the full sequence per token (no cache)."""
    for _ in range(new_tokens):
        ids = torch.cat([ids, logits(model, ids)[:, -1:].float().argmax(-1)], dim=1)
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bf16", action="store_true", help="bf16 weights through Float16Module")
    p.add_argument("--new-tokens", type=int, default=8)
    args = p.parse_args(argv)

    import torch.distributed as dist
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    import tp_layers
    from tp_layers.megatron import gpt_layer_spec

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        tp_layers.init_tp("gloo")
    else:  # Megatron's parallel state needs a process group even at TP 1
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()
    vocab, seq = 128, 16
    with cpu_model_parallel(world):
        config = gpt_config(world, bf16=args.bf16)
        ref = build_gpt(config, get_gpt_layer_local_spec(), vocab, seq, seed=1234)
        ours = build_gpt(config, gpt_layer_spec(), vocab, seq, seed=1234)
        if args.bf16:
            ref, ours = Float16Module(config, ref).eval(), Float16Module(config, ours).eval()
        ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0))
        tp_layers.reset_path_counts()
        with torch.no_grad():
            want, got = greedy(ref, ids, args.new_tokens), greedy(ours, ids, args.new_tokens)
            err = (logits(ours, ids) - logits(ref, ids)).abs().max()
        if rank == 0:
            print(f"TP {world} {'bf16' if args.bf16 else 'fp32'}: row-layer paths", end=" ")
            print(tp_layers.path_counts())
            print(f"greedy tokens (ours):      {got[:, 6:].tolist()}")
            print(f"greedy tokens (Megatron):  {want[:, 6:].tolist()}")
            print(f"identical: {torch.equal(got, want)}; logits max |diff| {err.item():.3g}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
