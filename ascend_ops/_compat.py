"""The one place for facts that depend on the torch / Python version (support window: torch
2.5.1 .. 2.14, Python 3.10 .. 3.12; pyproject.toml).

Code elsewhere imports from here instead of testing versions itself. Each entry names the oldest
release that has the feature; README "Compatibility" lists the pairs the suite ran on.
"""

from __future__ import annotations

import re

import torch

__all__ = ["DYNAMO_REPORTS_EXCEPTION_ARGS", "TORCH_VERSION"]


def _release(version: str) -> tuple[int, int, int]:
    """``"2.7.1+cu126"`` -> ``(2, 7, 1)`` (local and pre-release parts dropped)."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        raise ValueError(f"torch.__version__: cannot parse {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


TORCH_VERSION: tuple[int, int, int] = _release(torch.__version__)

# An exception raised by traced code under torch.compile(fullgraph=True) reaches the caller as
# dynamo's "Observed exception" error. From torch 2.9 its text carries the exception's args (our
# "x3: ... (C7)" message); 2.6-2.8 print only the exception class, 2.5 not even that
# (torch/_dynamo/symbolic_convert.py, exception_handler: `raised exception
# {curr_exc.python_type_name()}({curr_exc.args})` in 2.9.1, absent in 2.8.0; seen on 2.5.1 and
# 2.7.1). Eager calls raise the message in every version.
DYNAMO_REPORTS_EXCEPTION_ARGS: bool = TORCH_VERSION >= (2, 9)
