"""Quantize the float demo model (W8A16, static W8A8, W8A8 dynamic), load each checkpoint at TP
= world size, generate, and compare with the float model.

    torchrun --nproc-per-node 2 examples/quantize_and_generate.py
    python examples/quantize_and_generate.py --max-new-tokens 16
    python examples/quantize_and_generate.py --schemes w8a8 --smooth      # + smoothed W8A8

Rank 0 quantizes with ``quant.quantize_checkpoint`` (what ``python -m quant`` runs) into
``<model>-<scheme>`` beside the model directory (kept for the next run; ``--force`` redoes it).
Static W8A8 is calibrated on a few prompts: a calib file with their ``input_ids`` (+
``attention_mask``), which the converter runs through the float model to record every linear
layer's input range. ``--smooth [ALPHA]`` adds a static W8A8 checkpoint with outlier smoothing
(``quantize_checkpoint(..., smooth=ALPHA)``, dir ``<model>-w8a8_smooth<ALPHA>``). Every checkpoint is then loaded with ``tp_layers.load_pretrained`` (this
rank's shards only), and two numbers are reported against the float model at the same TP size:

- token agreement: greedy ``generate`` from the prompt, fraction of the new tokens equal to the
  float model's (and where they first diverge);
- logit error: the float model's generated sequence fed once (teacher forcing), the quantized
  logits vs the float ones: relative Frobenius error and top-1 agreement over all positions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from generate import DEFAULT_MODEL, ensure_demo_model, model_kind, setup_tp  # noqa: E402

import tp_layers  # noqa: E402
from quant import W8A8, W8A16, Scheme, quantize_checkpoint  # noqa: E402

SCHEMES: dict[str, Scheme] = {
    "w8a16": W8A16(),
    "w8a8": W8A8(dynamic=False),
    "w8a8_dynamic": W8A8(dynamic=True),
}
CALIB_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little robot who",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Water boils at a temperature of",
]


def write_calib(tok, path: Path) -> None:
    """A token-id calib file (quant.calibration format 2) from CALIB_PROMPTS."""
    from safetensors.torch import save_file

    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(CALIB_PROMPTS, return_tensors="pt", padding=True)
    save_file(
        {
            "input_ids": enc.input_ids.contiguous(),
            "attention_mask": enc.attention_mask.contiguous(),
        },
        str(path),
    )


def runs(smooth: float | None) -> dict[str, tuple[Scheme, float | None]]:
    """Row name -> (scheme, smoothing alpha); the smoothed row only with --smooth."""
    out: dict[str, tuple[Scheme, float | None]] = {n: (s, None) for n, s in SCHEMES.items()}
    if smooth is not None:
        out[f"w8a8_smooth{smooth:g}"] = (SCHEMES["w8a8"], smooth)
    return out


def quantize_all(
    model_dir: Path, tok, force: bool, todo: dict[str, tuple[Scheme, float | None]]
) -> dict[str, Path]:
    """Rank 0: ``<model>-<name>`` for every run (reused when present)."""
    outs = {}
    calib = model_dir.parent / f"{model_dir.name}-calib.safetensors"
    calib_written = False
    for name, (scheme, smooth) in todo.items():
        out = model_dir.parent / f"{model_dir.name}-{name}"
        outs[name] = out
        if out.is_dir() and not force:
            continue
        static = isinstance(scheme, W8A8) and not scheme.dynamic
        if static and not calib_written and (force or not calib.is_file()):
            write_calib(tok, calib)
            calib_written = True
        t0 = time.perf_counter()
        res = quantize_checkpoint(
            str(model_dir),
            str(out),
            scheme,
            calib=str(calib) if static else None,
            smooth=smooth,
            force=True,
            progress=False,
        )
        print(f"[quantize] {res.summary()} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return outs


def run(model: torch.nn.Module, ids: torch.Tensor, n: int, pad: int) -> torch.Tensor:
    """Greedy new tokens (n,) with the KV cache."""
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=n,
            do_sample=False,
            attention_mask=torch.ones_like(ids),
            pad_token_id=pad,
        )
    return out[0, ids.shape[1] :]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="float model dir")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--force", action="store_true", help="re-quantize existing outputs")
    p.add_argument(
        "--smooth",
        nargs="?",
        type=float,
        const=0.5,
        default=None,
        metavar="ALPHA",
        help="also run static W8A8 with outlier smoothing (alpha, default 0.5)",
    )
    args = p.parse_args(argv)
    todo = {n: v for n, v in runs(args.smooth).items() if n in args.schemes or v[1] is not None}

    import transformers

    tp = setup_tp()
    if args.model == DEFAULT_MODEL:
        ensure_demo_model(args.model, tp)
    tok = transformers.AutoTokenizer.from_pretrained(str(args.model), local_files_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if tp.rank == 0:
        print(f"model: {model_kind(args.model)}; TP size {tp.size}", flush=True)
        dirs = quantize_all(args.model, tok, args.force, todo)
    else:
        dirs = {name: args.model.parent / f"{args.model.name}-{name}" for name in todo}
    if tp.size > 1:
        dist.barrier()  # the other ranks wait for rank 0's checkpoints

    ids = tok(args.prompt, return_tensors="pt").input_ids
    fmodel = tp_layers.load_pretrained(args.model, tp, dtype=torch.bfloat16, pad_heads=True)
    ftokens = run(fmodel, ids, args.max_new_tokens, pad)
    seq = torch.cat([ids[0], ftokens]).unsqueeze(0)
    with torch.no_grad():
        flogits = fmodel(seq).logits.float()[0, ids.shape[1] - 1 : -1]  # predicts ftokens
    del fmodel
    rows = [("float", 1.0, None, 0.0, 1.0, tok.decode(ftokens, skip_special_tokens=True))]
    for name in todo:
        model = tp_layers.load_pretrained(dirs[name], tp, dtype=torch.bfloat16, pad_heads=True)
        qtokens = run(model, ids, args.max_new_tokens, pad)
        with torch.no_grad():
            qlogits = model(seq).logits.float()[0, ids.shape[1] - 1 : -1]
        del model
        n = min(len(qtokens), len(ftokens))
        agree = float((qtokens[:n] == ftokens[:n]).float().mean()) if n else 0.0
        first = next((i for i in range(n) if qtokens[i] != ftokens[i]), None)
        rel = float(torch.linalg.norm(qlogits - flogits) / torch.linalg.norm(flogits))
        top1 = float((qlogits.argmax(-1) == flogits.argmax(-1)).float().mean())
        rows.append((name, agree, first, rel, top1, tok.decode(qtokens, skip_special_tokens=True)))
    if tp.rank == 0:
        print(f"\nprompt: {args.prompt!r}; {args.max_new_tokens} greedy tokens at TP {tp.size}")
        print(
            f"{'scheme':<17} {'tokens agree':>12} {'1st diff':>8} {'logit rel err':>13} {'top-1':>6}"
        )
        for name, agree, first, rel, top1, _ in rows:
            print(
                f"{name:<17} {agree:>12.1%} {'-' if first is None else first:>8} "
                f"{rel:>13.4f} {top1:>6.1%}"
            )
        print()
        for name, *_, text in rows:
            print(f"{name:<17} {text!r}")
    if tp.size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
