"""The recommended recipe per scheme (what ``python -m quant --scheme S --calib FILE`` does
without other flags), chosen by ``python -m bench quant``; see the README quant section."""

from __future__ import annotations

import argparse
from typing import Any

from quant.schemes import W8A8, W8A16, Scheme

__all__ = ["RECOMMENDED", "accuracy_kwargs", "parse_fallback", "recipe_key", "recommended"]

#: recipe key (``recipe_key``) -> quantize_checkpoint settings used when a calib file is given
#: and the flag is not set on the command line (``--recipe plain`` turns them off). Each entry is
#: the best row of ``python -m bench quant`` for that scheme (README quant section): GPTQ pays
#: for per-group int8 weights only, dynamic W8A8 needs smoothing only, static W8A8 both, with a
#: fixed alpha (the per-group search picks alphas of lower layer error but higher perplexity).
RECOMMENDED: dict[str, dict[str, Any]] = {
    "W8A16": {},
    "W8A16 per-group": {"gptq": True},
    "W8A8": {"smooth": 0.8, "gptq": True},
    "W8A8_DYNAMIC": {"smooth": "auto"},
}


def recipe_key(scheme: Scheme) -> str:
    """The ``RECOMMENDED`` key of a scheme: its quant type, ``"W8A16 per-group"`` for W8A16 with
    a group size."""
    if isinstance(scheme, W8A16) and scheme.group_size:
        return "W8A16 per-group"
    return scheme.name


def recommended(scheme: Scheme) -> dict[str, Any]:
    """A copy of the recommended settings of ``scheme`` (empty for FP)."""
    return dict(RECOMMENDED.get(recipe_key(scheme), {}))


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
        for key, value in recommended(scheme).items():
            if key == "smooth" and not isinstance(scheme, W8A8):
                continue
            if kw[key] in (None, False):
                kw[key] = value
                kw["best_effort"].append(key)
    return kw
