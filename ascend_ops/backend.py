"""Backend selection: tensors on an ``npu`` device go to torch_npu, everything else to the
portable backend (plain torch + torch.distributed).

torch_npu is imported lazily, only when an NPU tensor is seen or the Ascend backend is forced,
and an ImportError/RuntimeError while importing it means "not available". Tests force the
Ascend backend onto CPU tensors with a torch_npu test double installed in ``sys.modules``::

    with ascend_ops.use_backend("ascend"):
        ...
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterator
from types import ModuleType

import torch

__all__ = ["Backend", "NpuNotAvailableError", "npu_module", "select", "use_backend"]


class Backend(enum.Enum):
    PORTABLE = "portable"
    ASCEND = "ascend"


class NpuNotAvailableError(RuntimeError):
    """An NPU tensor (or the forced Ascend backend) met a process without a working torch_npu."""


_forced: Backend | None = None
_env = os.environ.get("ASCEND_OPS_BACKEND")
if _env:
    try:
        _forced = Backend(_env.lower())
    except ValueError as e:
        raise ValueError(f"ASCEND_OPS_BACKEND: must be 'portable' or 'ascend', got {_env!r}") from e


@contextlib.contextmanager
def use_backend(name: str | Backend | None) -> Iterator[None]:
    """Force a backend ("ascend" / "portable") for the block; None restores device dispatch."""
    global _forced
    prev = _forced
    _forced = None if name is None else Backend(name if isinstance(name, str) else name.value)
    try:
        yield
    finally:
        _forced = prev


def forced() -> Backend | None:
    """The backend forced by use_backend / ASCEND_OPS_BACKEND, or None."""
    return _forced


def select(t: torch.Tensor | None = None) -> Backend:
    """The backend for a call whose main tensor is ``t``."""
    if _forced is not None:
        return _forced
    if t is not None and t.device.type == "npu":
        return Backend.ASCEND
    return Backend.PORTABLE


def npu_module() -> ModuleType:
    """Import torch_npu lazily; raise NpuNotAvailableError with the reason if it cannot load."""
    import sys

    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return mod
    try:
        import torch_npu  # type: ignore[import-not-found]
    except (ImportError, RuntimeError, OSError) as e:
        raise NpuNotAvailableError(
            "the Ascend backend needs torch_npu with the CANN runtime, which is not available "
            f"in this process ({type(e).__name__}: {e}); use CPU tensors for the portable backend"
        ) from e
    return torch_npu


def npu_available() -> bool:
    """True when torch_npu imports and reports a usable device (never raises)."""
    try:
        mod = npu_module()
        return bool(mod.npu.is_available())
    except Exception:
        return False
