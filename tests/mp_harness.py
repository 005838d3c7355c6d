"""Multi-rank test harness: run a test body on N gloo ranks in spawned worker processes.

Workers are spawned once per world size and reused across tests (torch is imported once per
worker, not per test). A body is a module-level function ``fn(rank, world_size, *args)``; its
return value must be picklable. Any rank's exception fails the call with that rank's traceback;
a body that does not finish within ``timeout`` (e.g. a hung collective) fails the call with a
TimeoutError and the pool is torn down and re-spawned for the next test, so the suite never hangs.

    from mp_harness import run_ranks
    results = run_ranks(2, body, arg1, arg2)           # list of per-rank return values
    outcomes = run_ranks(2, body, raise_on_error=False) # list of RankOutcome
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import importlib
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = [
    "RankError",
    "RankOutcome",
    "RankPool",
    "destroy_group_cleanly",
    "run_ranks",
    "shutdown_pools",
]

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS_DIR)
DEFAULT_TIMEOUT = float(os.environ.get("TP_TEST_TIMEOUT", "120"))


@dataclasses.dataclass
class RankOutcome:
    rank: int
    ok: bool
    value: Any = None
    exc_type: str = ""
    message: str = ""
    traceback: str = ""


class RankError(AssertionError):
    """A test body failed on one or more ranks."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_group_cleanly() -> None:
    """A barrier, then ``dist.destroy_process_group()`` (every group of this process), without
    the exit deadlock of torch 2.5.1 / 2.7.1.

    There the Python ProcessGroup wrapper frees its C++ group with the GIL held, and
    ``~ProcessGroupGloo`` joins its worker threads. A worker that drops the last reference to a
    finished collective's tensor whose Python object is already gone must take the GIL to free
    it, so the process hangs when the group's last reference goes (seen on 2.7.1 under load:
    gdb shows the main thread in ``std::thread::join`` under the ``ProcessGroup`` dealloc at the
    return of ``destroy_process_group``, a worker in ``take_gil`` under
    ``~AsyncAllreduceWork``; 2.13's ProcessGroup wrapper releases the GIL,
    pytorch/pytorch#154976). The Python wrapper of the gloo backend already releases it
    (``IntrusivePtrNoGilDestructor`` in torch/csrc/distributed/c10d/init.cpp), so the backends
    are held here until the groups are gone: ``~ProcessGroupGloo`` then runs in the last ``del``
    with the GIL free. The barrier is an all-reduce because ``dist.barrier()`` asks
    ``torch._C._get_accelerator()``, which raises once the npu double has renamed privateuse1.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    dist.all_reduce(torch.zeros(1))
    cpu = torch.device("cpu")
    backends = [g._get_backend(cpu) for g in list(distributed_c10d._world.pg_map)]
    dist.destroy_process_group()
    del backends


def _worker(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    for p in (_TESTS_DIR, _ROOT):
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    pg_timeout = float(os.environ.get("TP_TEST_PG_TIMEOUT", "60"))
    if world_size > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
    results.put(("ready", rank, None))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, mod_name, fn_name, args, kwargs = task
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
            value = fn(rank, world_size, *args, **kwargs)
            results.put((task_id, rank, RankOutcome(rank, True, value)))
        except BaseException as e:  # report everything, including assertion errors
            results.put(
                (
                    task_id,
                    rank,
                    RankOutcome(
                        rank, False, None, type(e).__name__, str(e), traceback.format_exc()
                    ),
                )
            )
    if world_size > 1 and dist.is_initialized():
        destroy_group_cleanly()


class RankPool:
    """``world_size`` worker processes with an initialised gloo group (none for size 1)."""

    def __init__(self, world_size: int, start_timeout: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results: mp.Queue = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self.procs = [
            ctx.Process(
                target=_worker, args=(r, world_size, port, self.tasks[r], self.results), daemon=True
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self._next = 0
        ready: set[int] = set()
        deadline = time.monotonic() + start_timeout
        while len(ready) < world_size:
            try:
                tag, rank, _ = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty as e:
                self.close(grace=2.0)
                raise TimeoutError(
                    f"rank pool of {world_size} did not start in {start_timeout}s"
                ) from e
            if tag == "ready":
                ready.add(rank)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = DEFAULT_TIMEOUT,
        **kwargs: Any,
    ) -> list[RankOutcome]:
        """Run ``fn(rank, world_size, *args, **kwargs)`` on every rank; per-rank outcomes.

        Raises TimeoutError (and kills the pool) if some rank does not answer in time.
        """
        self._next += 1
        task_id = self._next
        for q in self.tasks:
            q.put((task_id, fn.__module__, fn.__qualname__, args, kwargs))
        outcomes: dict[int, RankOutcome] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < self.world_size:
            left = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in outcomes]
            if left <= 0 or dead:
                missing = sorted(set(range(self.world_size)) - set(outcomes))
                failed = [o for o in outcomes.values() if not o.ok]
                self.close(grace=2.0)
                detail = "".join(f"\n--- rank {o.rank} ---\n{o.traceback}" for o in failed)
                why = (
                    f"died (ranks {dead})"
                    if dead and left > 0
                    else f"did not finish within {timeout:.0f}s"
                )
                raise TimeoutError(f"{fn.__qualname__}: ranks {missing} {why}{detail}")
            try:
                tid, rank, outcome = self.results.get(timeout=min(0.5, max(0.01, left)))
            except queue.Empty:
                continue
            if tid == task_id:
                outcomes[rank] = outcome
        return [outcomes[r] for r in range(self.world_size)]

    def close(self, grace: float = 10.0) -> None:
        """Ask every rank to leave (clean group shutdown), kill what is left after ``grace`` s
        (a rank stuck in a collective)."""
        for q in self.tasks:
            with contextlib.suppress(Exception):
                q.put(None)
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=2)


_pools: dict[tuple[int, str], RankPool] = {}


def get_pool(world_size: int, pool_key: str = "") -> RankPool:
    """The reused pool of ``world_size`` ranks; a non-empty ``pool_key`` reserves a separate
    pool (e.g. one per torch_npu release of the conformance matrix)."""
    pool = _pools.get((world_size, pool_key))
    if pool is None or not pool.alive():
        pool = _pools[world_size, pool_key] = RankPool(world_size)
    return pool


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = DEFAULT_TIMEOUT,
    raise_on_error: bool = True,
    pool_key: str = "",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn`` on ``world_size`` reused gloo ranks (of the pool ``pool_key``). Returns per-rank
    values, or per-rank RankOutcome when ``raise_on_error`` is False. A timeout always raises
    (pool re-spawned)."""
    pool = get_pool(world_size, pool_key)
    try:
        outcomes = pool.run(fn, *args, timeout=timeout, **kwargs)
    except TimeoutError:
        _pools.pop((world_size, pool_key), None)
        raise
    if not raise_on_error:
        return outcomes
    failed = [o for o in outcomes if not o.ok]
    if failed:
        detail = "".join(
            f"\n--- rank {o.rank}: {o.exc_type}: {o.message}\n{o.traceback}" for o in failed
        )
        raise RankError(f"{fn.__qualname__} failed on ranks {[o.rank for o in failed]}{detail}")
    return [o.value for o in outcomes]


def close_pools(pool_key: str) -> None:
    """Shut down the pools reserved under ``pool_key`` (every world size)."""
    for key in [k for k in _pools if k[1] == pool_key]:
        _pools.pop(key).close()


def shutdown_pools() -> None:
    for pool in list(_pools.values()):
        pool.close()
    _pools.clear()


atexit.register(shutdown_pools)
