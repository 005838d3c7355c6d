"""``python -m quant``: quantize a float safetensors model directory into an msmodelslim
checkpoint (``quant_model_description.json`` + safetensors shards).

Exit status (one line ``error: ...`` on stderr for every failure; the source and any earlier
output are never changed by a failed run):

- 0: success;
- 1: internal error (a bug; ``QUANT_DEBUG=1`` prints the traceback);
- 2: bad arguments or inputs (missing / truncated / corrupt source, unsafe ``--out``, ...);
- 3: the output could not be written (disk full, permissions); the temporary directory is removed;
- 130 / 143: interrupted by SIGINT / SIGTERM; the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from types import FrameType, TracebackType

import torch
from safetensors import SafetensorError

from quant.checkpoint import CheckpointWriteError, parse_size
from quant.convert import format_report, quantize_checkpoint
from quant.evaluate import load_text, run_eval
from quant.modules import DEFAULT_SKIP_PATTERNS
from quant.recipes import accuracy_kwargs
from quant.schemes import W8A8, W8A16, Scheme
from quant.smooth import DOWN_SMOOTH_ARCHITECTURES, SMOOTH_ARCHITECTURES

__all__ = ["EXIT_INPUT", "EXIT_INTERNAL", "EXIT_OK", "EXIT_WRITE", "build_parser", "main"]

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_WRITE = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM

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


_EXIT_STATUS = """
Exit status: 0 success; 1 internal error (QUANT_DEBUG=1 shows the traceback); 2 bad arguments
or inputs; 3 the output could not be written (disk full, ...); 130 / 143 interrupted by
SIGINT / SIGTERM. A failed run leaves the model and any earlier --out as they were.
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
    p.epilog += _EXIT_STATUS
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


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that it unwinds (and cleans up) like SIGINT."""


class _Failures:
    """Context of one CLI run: SIGINT / SIGTERM raise (once; a second signal cannot interrupt the
    cleanup), and every exception leaving the block becomes ``code`` and one ``error:`` line."""

    code = EXIT_OK

    def __enter__(self) -> _Failures:
        self._log = logging.StreamHandler(sys.stderr)  # the library's warnings, one line each
        self._log.setFormatter(logging.Formatter("warning: %(message)s"))
        self._log.setLevel(logging.WARNING)
        logging.getLogger("quant").addHandler(self._log)
        self._saved: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        for sig in self._saved:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        logging.getLogger("quant").removeHandler(self._log)
        if exc is None or not isinstance(exc, (Exception, KeyboardInterrupt, _Terminated)):
            return False
        self.code, message = _classify(exc)
        if self.code == EXIT_INTERNAL and os.environ.get("QUANT_DEBUG"):
            traceback.print_exception(exc)
        print(f"error: {message}", file=sys.stderr)
        return True


def _classify(exc: BaseException) -> tuple[int, str]:
    """(exit status, message) of a failed run."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGINT, "interrupted (SIGINT); nothing written, the output is unchanged"
    if isinstance(exc, _Terminated):
        return EXIT_SIGTERM, "terminated (SIGTERM); nothing written, the output is unchanged"
    if isinstance(exc, CheckpointWriteError):
        return EXIT_WRITE, f"{exc}; nothing written, the output is unchanged"
    if isinstance(exc, (ValueError, TypeError, OSError, SafetensorError)):
        return EXIT_INPUT, str(exc)
    return EXIT_INTERNAL, (
        f"internal error: {type(exc).__name__}: {exc} (a bug: please report it with the "
        "traceback QUANT_DEBUG=1 prints)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    with _Failures() as run:
        scheme = _scheme(args)
        parse_size(args.max_shard_size)
        if args.eval:  # fail before quantizing
            load_text(args.eval)
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
    if run.code != EXIT_OK:
        return run.code
    if args.report:
        print(format_report(result.reports))
    print(result.summary(), file=sys.stderr)
    if not args.eval:
        return EXIT_OK
    with _Failures() as run:
        return run_eval(args, scheme.name, _DTYPES[args.dtype])
    return run.code
