"""The TP context: process group, rank, world size and hcom name of one tensor-parallel group.

``TPContext.from_group(group)`` reads them from torch.distributed; ``TPContext.single()`` is world
size 1 with no process group at all; ``get_tp()`` is the default (the world group if
torch.distributed is initialised, else single). Every layer of a model must share one context
(CONTRACT.md C14: all fused ops of a model use the same communication domain).
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch.distributed as dist

import ascend_ops

__all__ = ["TPContext", "get_tp", "init_tp"]


@dataclasses.dataclass(frozen=True)
class TPContext:
    """One TP group. ``group`` is None for world size 1 without torch.distributed."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    hcom: str

    @classmethod
    def single(cls) -> TPContext:
        return cls(None, 0, 1, ascend_ops.LOCAL_HCOM)

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None = None) -> TPContext:
        """Context of ``group`` (default: the world group; single if dist is not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise ValueError("group: torch.distributed is not initialised")
            return cls.single()
        g = group if group is not None else dist.group.WORLD
        return cls(g, dist.get_rank(g), dist.get_world_size(g), ascend_ops.hcom_name(g))

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"TPContext: rank {self.rank} / size {self.size} is not valid")

    def __reduce__(self):
        return (get_tp, ())


def get_tp() -> TPContext:
    """The default TP context: the world group, or world size 1 without torch.distributed."""
    return TPContext.from_group(None)


def init_tp(
    backend: str | None = None,
    *,
    timeout: float | datetime.timedelta | None = None,
    world_size: int | None = None,
    rank: int | None = None,
    init_method: str | None = None,
) -> TPContext:
    """Initialise torch.distributed (if needed) and return the world TP context.

    ``timeout`` (seconds; default env ``TP_TIMEOUT`` or 300 s) bounds every collective, so a dead
    peer turns into an error on the other ranks instead of a hang. ``backend`` defaults to
    ``hccl`` when an NPU is available, else ``gloo``. Rank / world size come from the torchrun
    environment unless given.
    """
    if timeout is None:
        timeout = float(os.environ.get("TP_TIMEOUT", "300"))
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    if not dist.is_initialized():
        if backend is None:
            backend = "hccl" if ascend_ops.npu_available() else "gloo"
        kwargs: dict = {"backend": backend, "timeout": timeout}
        if world_size is not None:
            kwargs["world_size"] = world_size
        if rank is not None:
            kwargs["rank"] = rank
        if init_method is not None:
            kwargs["init_method"] = init_method
        dist.init_process_group(**kwargs)
    return get_tp()
