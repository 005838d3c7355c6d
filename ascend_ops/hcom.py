"""``hcom``: communication-domain names, as on Ascend.

The op takes the group as a string. ``hcom_name(group)`` hands out the name the op accepts:
on Ascend the HCCL communicator name, elsewhere the ProcessGroup's ``group_name``; with
torch.distributed not initialised, ``LOCAL_HCOM`` (world size 1: no collective is ever called).
``resolve_hcom(name)`` maps a name back to the torch ProcessGroup (portable backend and the
unfused all-reduce), raising ValueError naming the rule for an unknown name.
"""

from __future__ import annotations

import torch.distributed as dist

from ascend_ops import backend
from ascend_ops._validate import check_group

__all__ = ["LOCAL_HCOM", "hcom_name", "resolve_hcom"]

LOCAL_HCOM = "local"
_groups: dict[str, dist.ProcessGroup] = {}


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def hcom_name(group: dist.ProcessGroup | None = None) -> str:
    """The communication-domain name of ``group`` (default: the world group) that
    mm_all_reduce_base accepts. Without torch.distributed initialised: ``LOCAL_HCOM``."""
    if not _dist_ready():
        if group is not None:
            raise ValueError(
                "group: torch.distributed is not initialised, so no group can be named (C4)"
            )
        return LOCAL_HCOM
    group = group if group is not None else dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group: this rank is not a member of the group ({group!r}) (C4)")
    if backend.forced() is backend.Backend.ASCEND or _has_npu_backend(group):
        from ascend_ops import _npu

        # the vendor doc of get_hccl_comm_name: the rank passed is the GLOBAL rank id
        name = _npu.hcom_name(group, dist.get_rank())
    else:
        name = group.group_name
    _groups[name] = group
    return name


def _has_npu_backend(group: dist.ProcessGroup) -> bool:
    if not backend.npu_available():
        return False
    try:
        import torch

        group._get_backend(torch.device("npu"))
        return True
    except Exception:
        return False


def resolve_hcom(hcom: str) -> dist.ProcessGroup | None:
    """The ProcessGroup that ``hcom`` names, or None for a world-size-1 domain (no collective).

    Checks C4 (known name; ``LOCAL_HCOM`` only outside a multi-rank job) and C12 (world size
    1, 2, 4 or 8) before any collective.
    """
    if hcom == LOCAL_HCOM:
        if _dist_ready() and dist.get_world_size() > 1:
            raise ValueError(
                f"hcom: {LOCAL_HCOM!r} names a world-size-1 domain, but this process is rank "
                f"{dist.get_rank()} of an initialised {dist.get_world_size()}-rank job, so the "
                "reduction would silently be skipped; pass ascend_ops.hcom_name(group) (a layer "
                "that wants no communication takes reduce_results=False) (C4)"
            )
        return None
    group = _groups.get(hcom)
    if group is None:
        if not _dist_ready():
            raise ValueError(
                f"hcom: unknown communication domain {hcom!r}: torch.distributed is not "
                f"initialised (use ascend_ops.hcom_name() -> {LOCAL_HCOM!r} for world size 1) (C4)"
            )
        try:
            group = dist.distributed_c10d._resolve_process_group(hcom)
        except Exception as e:
            raise ValueError(
                f"hcom: unknown communication domain {hcom!r}; get the name from "
                "ascend_ops.hcom_name(group) (C4)"
            ) from e
        _groups[hcom] = group
    ws = group.size()
    check_group(ws, hcom)
    return group if ws > 1 else None
