"""Greedy generation with the KV cache on a tensor-parallel Hugging Face model.

    torchrun --nproc-per-node 2 examples/generate.py            # TP 2 (gloo on CPU)
    python examples/generate.py --prompt "The capital of France is"   # TP 1
    torchrun --nproc-per-node 2 examples/generate.py --quant-dir .cache/demo-model-w8a16

The model directory (default: the demo model, created by examples/make_demo_model.py when
missing) is loaded with ``tp_layers.load_pretrained`` at TP = world size, each rank reading only
its shards; ``model.generate`` then runs the prefill (one forward over the prompt: the
row-parallel layers take the fused matmul + all-reduce) and one forward per new token (decode:
local matmul, then all-reduce). Rank 0 prints the text, prefill / decode tokens per second and
the path counters of each phase; ``--check`` also runs the unsharded (TP 1) model on rank 0 and
reports token agreement and the prefill logit error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tp_layers  # noqa: E402
from tp_layers import TPContext  # noqa: E402

DEFAULT_MODEL = ROOT / ".cache" / "demo-model"


class PhaseTimer:
    """A ``generate`` streamer recording when the prompt went in and each token came out, and
    the path counters at the first token (end of prefill) and at the end."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prefill_counts: dict[str, int] = {}
        self.total_counts: dict[str, int] = {}

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 2:
            self.prefill_counts = tp_layers.path_counts()

    def end(self) -> None:
        self.total_counts = tp_layers.path_counts()

    @property
    def prefill_s(self) -> float:
        return self.times[1] - self.times[0]

    @property
    def decode_s(self) -> float:
        return self.times[-1] - self.times[1]

    def decode_counts(self) -> dict[str, int]:
        return {k: v - self.prefill_counts.get(k, 0) for k, v in self.total_counts.items()}


def setup_tp(tp_size: int | None = None) -> TPContext:
    """The TP group under torchrun: the world, or with ``tp_size`` the sub-group of
    ``tp_size`` consecutive ranks (one node under ``--nproc-per-node tp_size``; the groups are
    data-parallel replicas). TP 1 (no process group) under plain python."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        world = tp_layers.init_tp()
        tp = world
        if tp_size is not None and tp_size != world.size:
            if tp_size < 1 or world.size % tp_size:
                raise SystemExit(f"--tp-size {tp_size}: must divide the world size {world.size}")
            starts = range(0, world.size, tp_size)
            groups = [dist.new_group(list(range(s, s + tp_size))) for s in starts]
            tp = TPContext.from_group(groups[world.rank // tp_size])
    else:
        tp = TPContext.single()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.size))
    return tp


def ensure_demo_model(path: Path, tp: TPContext) -> None:
    """Create the demo model on each host's first rank if it is missing; the others wait."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not (path / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "examples"))
        import make_demo_model

        make_demo_model.main(["--out", str(path)])
    if dist.is_initialized():
        dist.barrier()


def model_kind(path: Path) -> str:
    marker = path / "demo_model.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        return f"{info['kind']} ({info['source']})"
    return str(path)


def prompt_ids(tok, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tok(prompt, return_tensors="pt").input_ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model dir (tokenizer too)")
    p.add_argument("--quant-dir", type=Path, help="load the weights from this (quantized) dir")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="model dtype (default: the checkpoint's; the demo model: bfloat16)",
    )
    p.add_argument("--check", action="store_true", help="compare with TP 1 on rank 0")
    p.add_argument(
        "--tp-size",
        type=int,
        help="TP group size (default: the world size); the groups are data-parallel replicas",
    )
    args = p.parse_args(argv)

    import transformers

    tp = setup_tp(args.tp_size)
    if tp.rank == 0:  # tp_layers' notes (e.g. the pad_heads overhead) on rank 0
        logging.basicConfig(format="[%(name)s] %(message)s")
        logging.getLogger("tp_layers").setLevel(logging.INFO)
    if args.model == DEFAULT_MODEL:
        ensure_demo_model(args.model, tp)
    weights = args.quant_dir or args.model
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tok = transformers.AutoTokenizer.from_pretrained(str(args.model), local_files_only=True)
    ids = prompt_ids(tok, args.prompt, args.chat)

    t0 = time.perf_counter()
    # SmolLM2's 9 q / 3 kv heads do not split over TP 2: pad them with zero heads (exact)
    model = tp_layers.load_pretrained(weights, tp, dtype=dtype, pad_heads=True)
    load_s = time.perf_counter() - t0
    report = model.tp_load_report
    gen_kw = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": False,
        "attention_mask": torch.ones_like(ids),
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    }
    with torch.no_grad():  # warm-up (first-call allocations), not timed
        model.generate(ids, **{**gen_kw, "max_new_tokens": 2})
    timer = PhaseTimer()
    tp_layers.reset_path_counts()
    with torch.no_grad():
        out = model.generate(ids, streamer=timer, **gen_kw)
    new = out[0, ids.shape[1] :]
    if tp.size > 1:  # every rank must have produced the same tokens
        gathered = [torch.empty_like(new) for _ in range(tp.size)]
        dist.all_gather(gathered, new, group=tp.group)
        assert all(torch.equal(g, new) for g in gathered), "ranks disagree on the tokens"
    mib = report.bytes_read / 2**20
    lead = tp.rank == 0 and (not dist.is_initialized() or dist.get_rank() == 0)
    print(
        f"[rank {dist.get_rank() if dist.is_initialized() else 0}] loaded {mib:.1f} MiB in {report.reads} reads ({load_s:.1f}s)"
    )
    if tp.size > 1:
        dist.barrier(group=tp.group)
    if lead:
        n_new = len(new)
        print(
            f"model:   {model_kind(args.model)}"
            + (f", weights {weights}" if args.quant_dir else "")
        )
        print(f"TP size: {tp.size}   dtype: {str(model.dtype).removeprefix('torch.')}")
        print(f"prompt:  {args.prompt!r} ({ids.shape[1]} tokens)")
        print(f"output:  {tok.decode(new, skip_special_tokens=True)!r}")
        print(f"tokens:  {new.tolist()}")
        print(
            f"prefill: {ids.shape[1]} tokens in {timer.prefill_s * 1e3:.0f} ms "
            f"({ids.shape[1] / timer.prefill_s:.1f} tok/s), paths {timer.prefill_counts}"
        )
        if n_new > 1:
            print(
                f"decode:  {n_new - 1} tokens in {timer.decode_s * 1e3:.0f} ms "
                f"({(n_new - 1) / timer.decode_s:.1f} tok/s), paths {timer.decode_counts()}"
            )
    if args.check:
        with torch.no_grad():
            tp_logits = model(ids).logits.float()  # collective: every rank runs it
        if lead:
            check(weights, ids, new, tp_logits, gen_kw, model.dtype)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def check(
    weights: Path,
    ids: torch.Tensor,
    new: torch.Tensor,
    tp_logits: torch.Tensor,
    gen_kw: dict,
    dtype: torch.dtype,
) -> None:
    """Rank 0: the same generation and prefill with the unsharded model: transformers' own for
    a float directory, tp_layers at TP 1 for a quantized one.

    ids: (1, s) prompt; new: (t,) tokens of the TP model; tp_logits: (1, s, vocab) float32.
    """
    if (weights / "quant_model_description.json").is_file():
        ref = tp_layers.load_pretrained(weights, TPContext.single(), dtype=dtype)
    else:
        import transformers

        ref = transformers.AutoModelForCausalLM.from_pretrained(str(weights), dtype=dtype).eval()
    with torch.no_grad():
        ref_new = ref.generate(ids, **gen_kw)[0, ids.shape[1] :]
        ref_logits = ref(ids).logits.float()
    n = min(len(ref_new), len(new))
    same = int((ref_new[:n] == new[:n]).sum())
    first = next((i for i in range(n) if ref_new[i] != new[i]), None)
    err = (tp_logits - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    print(
        f"check:   vs the unsharded model: {same}/{n} new tokens agree"
        + ("" if first is None else f" (first divergence at token {first})")
        + f"; prefill logits max |diff| {err:.3g} (max |logit| {scale:.3g})"
    )


if __name__ == "__main__":
    sys.exit(main())
