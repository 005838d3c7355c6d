"""``python -m quant``: quantize a float safetensors model directory into an msmodelslim
checkpoint (``quant_model_description.json`` + safetensors shards).

Exit codes: 0 success, 2 bad arguments or inputs (message on stderr, no output written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from quant.checkpoint import parse_size
from quant.convert import format_report, quantize_checkpoint
from quant.modules import DEFAULT_SKIP_PATTERNS
from quant.recipes import accuracy_kwargs
from quant.schemes import W8A8, W8A16, Scheme
from quant.smooth import DOWN_SMOOTH_ARCHITECTURES, SMOOTH_ARCHITECTURES

__all__ = ["build_parser", "main"]

_SCHEMES = ("w8a16", "w8a8", "w8a8_dynamic")
_DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}

_EPILOG = f"""\
Layers kept FLOAT: every tensor that is not a 2-D float '*.weight', and modules matching
the default patterns {", ".join(DEFAULT_SKIP_PATTERNS)} (case-insensitive re.search), plus
--skip patterns.

--calib FILE (required for w8a8; optional for the others, where it adds output errors to
--report) is a plain text file or a .jsonl of prompts (tokenized with the model's tokenizer;
--calib-samples sequences of --calib-seq-len tokens), or a safetensors file with, per linear module M (its weight name minus '.weight'):
  "M": float tensor (..., k) of sample inputs to that layer, or
  "M.input_min", "M.input_max": one-element tensors with an observed input range;
or "input_ids" (int, batch x seq) [+ "attention_mask"] to run through the float model
(needs config.json in --model and transformers).

--smooth [ALPHA] divides each pre-attention / pre-MLP norm's weight by per-channel factors
s = max|X|^ALPHA / max|W|^(1-ALPHA) and multiplies the weight columns of the linears it feeds
(q/k/v, gate/up) by s before quantizing: the same float model, flatter activations. The norms
are written FLOAT. In gated MLPs (model_type {", ".join(sorted(DOWN_SMOOTH_ARCHITECTURES))})
down_proj's inputs are smoothed too: up_proj's output rows divided by down_proj's factors, its
columns multiplied (exact in float). Needs per-channel calib activations and a known
architecture (config.json model_type: {", ".join(sorted(SMOOTH_ARCHITECTURES))}). o_proj is
smoothed through v_proj's output rows (GQA-aware); starcoder2's c_proj (after an ungated
activation) is not. Without ALPHA it is searched per group (least quantized output error).
"""


def _smooth_arg(v: str) -> float | str:
    return "auto" if v == "auto" else float(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quant",
        description="Quantize a Hugging Face style safetensors model directory into an "
        "msmodelslim checkpoint for Ascend (W8A16, static W8A8, W8A8_DYNAMIC).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="DIR", help="float model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument(
        "--scheme", required=True, type=str.lower, choices=_SCHEMES, help="quantization scheme"
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=0,
        metavar="N",
        help="w8a16 only: per-group size (multiple of 32 dividing k); 0 = per-channel",
    )
    p.add_argument(
        "--asymmetric",
        action="store_true",
        help="w8a16 only: asymmetric min-max weights (default symmetric)",
    )
    p.add_argument("--calib", metavar="FILE", help="calibration file (see below)")
    p.add_argument(
        "--observer",
        choices=("minmax", "percentile", "mse"),
        default="minmax",
        help="w8a8 activation range observer (default minmax)",
    )
    p.add_argument(
        "--percentile",
        type=float,
        default=99.99,
        help="percentile for --observer percentile (default 99.99)",
    )
    p.add_argument(
        "--smooth",
        nargs="?",
        type=_smooth_arg,
        const="auto",
        default=None,
        metavar="ALPHA",
        help="w8a8 / w8a8_dynamic, needs --calib: SmoothQuant-style outlier smoothing "
        "(msmodelslim anti-outlier) of the linears fed by a norm and of gated MLPs' down_proj; "
        "ALPHA in [0, 1] or 'auto' (default: searched per group). Off unless given",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="PATTERN",
        help="extra module-name regexes to keep in float",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default="auto",
        help="output model dtype (default: keep each tensor's dtype)",
    )
    p.add_argument("--max-shard-size", default="2GB", help="output shard size (default 2GB)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--report",
        action="store_true",
        help="print per-layer weight (and, with --calib activations, output) errors",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_accuracy_args(p)
    return p


def _add_accuracy_args(p: argparse.ArgumentParser) -> None:
    """Flags of the accuracy tools (quant.evaluate, quant.calibration, quant.gptq)."""
    g = p.add_argument_group("accuracy")
    g.add_argument("--eval", metavar="TEXT_FILE", help="print float / quantized perplexity")
    g.add_argument("--eval-window", type=int, default=512, metavar="N", help="tokens per window")
    g.add_argument("--eval-max-windows", type=int, default=None, metavar="N", help="cap windows")
    g.add_argument("--calib-samples", type=int, default=8, metavar="N", help="text calib sequences")
    g.add_argument(
        "--calib-seq-len", type=int, default=512, metavar="N", help="tokens per sequence"
    )
    g.add_argument("--gptq", action="store_true", help="GPTQ weight rounding (needs --calib)")
    g.add_argument("--exclude", nargs="*", default=[], metavar="GLOB", help="linears kept FLOAT")
    g.add_argument(
        "--fallback", default=None, metavar="auto[:N]", help="keep the N worst linears FLOAT"
    )
    g.add_argument(
        "--recipe",
        choices=("recommended", "plain"),
        default="recommended",
        help="with --calib: recommended = the measured best settings per scheme (README)",
    )


def _scheme(args: argparse.Namespace) -> Scheme:
    if args.scheme != "w8a16" and (args.group_size or args.asymmetric):
        raise ValueError("--group-size and --asymmetric apply to --scheme w8a16 only")
    if args.smooth is not None and args.scheme == "w8a16":
        raise ValueError("--smooth applies to --scheme w8a8 / w8a8_dynamic only")
    if args.smooth is not None and not args.calib:
        raise ValueError("--smooth needs --calib FILE (per-channel activation maxima)")
    if args.scheme == "w8a16":
        return W8A16(group_size=args.group_size, symmetric=not args.asymmetric)
    return W8A8(dynamic=args.scheme == "w8a8_dynamic")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 error)."""
    args = build_parser().parse_args(argv)
    try:
        scheme = _scheme(args)
        parse_size(args.max_shard_size)
        if args.eval:  # fail before quantizing
            __import__("quant.evaluate").evaluate.load_text(args.eval)
        result = quantize_checkpoint(
            args.model,
            args.out,
            scheme,
            calib=args.calib,
            skip=args.skip,
            force=args.force,
            report=args.report,
            observer=args.observer,
            percentile=args.percentile,
            model_dtype=_DTYPES[args.dtype],
            max_shard_size=args.max_shard_size,
            progress=not args.no_progress,
            **accuracy_kwargs(args, scheme),
        )
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.report:
        print(format_report(result.reports))
    print(result.summary(), file=sys.stderr)
    if args.eval:
        from quant.evaluate import run_eval

        return run_eval(args, scheme.name, _DTYPES[args.dtype])
    return 0
