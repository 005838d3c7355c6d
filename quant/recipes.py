"""The recommended recipe per scheme (what ``python -m quant --scheme S --calib FILE`` does
without other flags), chosen by ``python -m bench quant``; see the README quant section."""

from __future__ import annotations

import argparse
from typing import Any

from quant.schemes import W8A8, Scheme

__all__ = ["RECOMMENDED", "accuracy_kwargs", "parse_fallback"]

#: scheme name -> quantize_checkpoint settings used when a calib file is given and the flag is
#: not set on the command line (``--recipe plain`` turns them off)
RECOMMENDED: dict[str, dict[str, Any]] = {
    "W8A16": {"gptq": True},
    "W8A8": {"smooth": "auto", "gptq": True},
    "W8A8_DYNAMIC": {"smooth": "auto", "gptq": True},
}


def parse_fallback(v: str | None) -> int:
    """``--fallback auto[:N]`` -> N (``auto`` alone: 1; not given: 0)."""
    if v is None:
        return 0
    head, _, n = v.partition(":")
    if head != "auto" or (n and not n.isdigit()):
        raise ValueError(f"--fallback: expected auto or auto:N, got {v!r}")
    return int(n) if n else 1


def accuracy_kwargs(args: argparse.Namespace, scheme: Scheme) -> dict[str, Any]:
    """quantize_checkpoint keyword arguments of the accuracy flags, with the recommended
    recipe filling what the command line leaves unset."""
    kw: dict[str, Any] = {
        "calib_samples": args.calib_samples,
        "calib_seq_len": args.calib_seq_len,
        "exclude": args.exclude,
        "fallback": parse_fallback(args.fallback),
        "smooth": args.smooth,
        "gptq": args.gptq,
        "best_effort": [],
    }
    if args.recipe == "recommended" and args.calib:
        for key, value in RECOMMENDED.get(scheme.name, {}).items():
            if key == "smooth" and not isinstance(scheme, W8A8):
                continue
            if kw[key] in (None, False):
                kw[key] = value
                kw["best_effort"].append(key)
    return kw
