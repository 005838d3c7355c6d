"""Failure injection: one rank of a TP group dies in the middle of a RowParallelLinear forward
(fused prefill and unfused decode, TP 2 and 4, os._exit and SIGKILL, rank 0 and others) or hangs
there; every surviving rank must raise a clear error within the group's timeout instead of
hanging: a RuntimeError naming the collective, the communication domain, the rank and the likely
cause (ascend_ops._portable wraps c10d's "Connection reset by peer" / "Timed out waiting").

A killed rank poisons its process group, so the reused workers of tests/mp_harness.py cannot be
used: each case starts fresh processes (forked from a forkserver that preloaded torch) with their
own gloo group and a short timeout (``tp_layers.init_tp(timeout=PG_TIMEOUT)``). After one healthy
forward and a barrier, the victim replaces ``torch.distributed.all_reduce`` with a suicide, so it
dies inside the forward after its local matmul, exactly where the fused op / the decode
all-reduce exchange partial sums. Each survivor measures the time from the start of its forward
to the exception (printed with ``-s``). A dead peer's closed sockets fail the others at once; a
stuck one ("hang") only through the timeout."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import socket
import sys
import time

import pytest

PG_TIMEOUT = 5.0  # seconds: the gloo group's collective timeout
# Survivors must fail within PG_TIMEOUT + SLACK of entering the forward (2 shared CPU cores:
# a survivor may be descheduled for a while; a hang would exceed this by far).
SLACK = 10.0
START_BUDGET = 120.0  # spawn + import torch on a loaded machine; never part of the measurement
K, N = 64, 48
VICTIM_EXIT = 17

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS_DIR)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_row_layer(rank: int, ws: int, port: int, timeout: float, bias: bool):
    """In a fresh worker process: the tests folder and the repo root on sys.path, one torch
    thread, a gloo TP group of ``ws`` ranks with collective timeout ``timeout`` (s) on
    ``port`` -> (RowParallelLinear(K, N) on it loaded with a seeded weight (N, K) (and bias),
    that weight, the generator after those draws)."""
    for p in (_TESTS_DIR, _ROOT):
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch

    import tp_layers as tl

    torch.set_num_threads(1)
    tp = tl.init_tp(
        "gloo",
        timeout=timeout,
        world_size=ws,
        rank=rank,
        init_method=f"tcp://127.0.0.1:{port}",
    )
    layer = tl.RowParallelLinear(K, N, bias=bias, params_dtype=torch.float32, tp=tp)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    layer.weight.weight_loader(layer.weight, w)
    if bias:
        layer.bias.weight_loader(layer.bias, torch.randn(N, generator=g))
    return layer, w, g


def _worker(rank: int, ws: int, port: int, victim: int, phase: str, how: str, conn) -> None:
    # conn.send is synchronous (an mp.Queue's feeder thread would lose messages at os._exit).
    try:
        import torch
        import torch.distributed as dist

        import tp_layers as tl

        layer, _, _ = _fresh_row_layer(rank, ws, port, PG_TIMEOUT, bias=True)
        m = 16 if phase == "prefill" else 1
        x = torch.randn(m, K // ws, generator=torch.Generator().manual_seed(1 + rank))
        with torch.no_grad(), tl.phase(phase):
            layer(x)  # a healthy pass first: the group works, connections are up
        dist.barrier()
        conn.send((rank, "ready", None))
        if rank == victim:

            def die(*args, **kwargs):
                if how == "exit":
                    os._exit(VICTIM_EXIT)
                if how == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)  # "hang": alive but stuck; the parent kills it afterwards

            dist.all_reduce = die  # the forward's collective (fused op and decode all-reduce)
        tl.reset_path_counts()
        t0 = time.monotonic()
        try:
            with torch.no_grad(), tl.phase(phase):
                layer(x)
        except Exception as e:
            elapsed = time.monotonic() - t0
            outcome = ("error", type(e).__name__, str(e), elapsed, tl.path_counts())
        else:
            outcome = ("no error", "", "", time.monotonic() - t0, tl.path_counts())
        conn.send((rank, "done", outcome))
    except BaseException as e:  # setup failure: report it, never hang the parent
        conn.send((rank, "setup failed", f"{type(e).__name__}: {e}"))
    # The group is poisoned: skip destroy_process_group (it may block on the dead peer).
    os._exit(0)


def _context():
    """forkserver with torch and tp_layers preloaded: each case forks its ranks from a process
    that imported them once (spawn would re-import torch in every rank of every case). The
    forkserver itself never runs a torch op, so no OpenMP pool is forked."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "tp_layers"])
    return ctx


def _inject(ws: int, victim: int, phase: str, how: str) -> tuple[dict[int, tuple], dict]:
    """Run one case in fresh processes; per-survivor outcomes and every process's exit code."""
    ctx = _context()
    port = _free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(ws)]
    procs = [
        ctx.Process(target=_worker, args=(r, ws, port, victim, phase, how, w), daemon=True)
        for r, (_, w) in enumerate(pipes)
    ]
    for p in procs:
        p.start()
    for _, w in pipes:
        w.close()  # the children hold the write ends: EOF once a rank exits
    readers = [rd for rd, _ in pipes]
    ready: set[int] = set()
    done: dict[int, tuple] = {}
    try:
        deadline = time.monotonic() + START_BUDGET
        while len(ready) < ws or len(done) < ws - 1:
            left = deadline - time.monotonic()
            if left <= 0 or not readers:
                pytest.fail(
                    f"ws={ws} victim={victim} {phase}/{how}: ready {sorted(ready)}, "
                    f"finished {sorted(done)}: a survivor hangs or died"
                )
            for rd in mp_connection.wait(readers, timeout=min(1.0, left)):
                try:
                    rank, tag, payload = rd.recv()
                except EOFError:  # that rank exited: nothing more from it
                    readers.remove(rd)
                    continue
                if tag == "setup failed":
                    pytest.fail(f"rank {rank} failed before the injection: {payload}")
                if tag == "ready":
                    ready.add(rank)
                    # The forward under test is short: once everyone is ready the survivors
                    # have PG_TIMEOUT + SLACK (+ scheduling margin) to report, else they hang.
                    if len(ready) == ws:
                        deadline = time.monotonic() + PG_TIMEOUT + SLACK + 15.0
                else:
                    done[rank] = payload
        if how == "hang":
            procs[victim].kill()
        for p in procs:
            p.join(timeout=10)
        codes = {r: p.exitcode for r, p in enumerate(procs)}
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for rd, _ in pipes:
            rd.close()
    return done, codes


CASES = [
    # (world size, victim rank, phase, how the victim dies)
    (2, 1, "prefill", "exit"),
    (2, 0, "decode", "sigkill"),
    (4, 2, "prefill", "sigkill"),
    (4, 3, "decode", "exit"),
    # a stuck (not dead) peer: only the group's timeout can end the wait
    (2, 1, "decode", "hang"),
]


@pytest.mark.parametrize(("ws", "victim", "phase", "how"), CASES)
def test_dead_rank_fails_the_others_within_the_timeout(
    ws: int, victim: int, phase: str, how: str
) -> None:
    done, codes = _inject(ws, victim, phase, how)
    path = "fused" if phase == "prefill" else "unfused"
    expected_code = {"exit": VICTIM_EXIT, "sigkill": -signal.SIGKILL, "hang": -signal.SIGKILL}
    assert codes[victim] == expected_code[how], codes
    survivors = [r for r in range(ws) if r != victim]
    assert sorted(done) == survivors
    report = []
    for r in survivors:
        status, exc_type, message, elapsed, counts = done[r]
        report.append(f"rank {r}: {status} after {elapsed:.2f}s: {exc_type}: {message[:600]}")
        assert status == "error", f"rank {r} finished its forward although rank {victim} died"
        assert counts[path] == 1, (r, counts)  # the forward took the path under test
        assert elapsed < PG_TIMEOUT + SLACK, f"rank {r}: error only after {elapsed:.1f}s"
        if how == "hang":  # nothing but the timeout can have ended the wait
            assert elapsed > 0.8 * PG_TIMEOUT, f"rank {r}: error after only {elapsed:.1f}s"
        assert exc_type == "RuntimeError", (r, exc_type, message)
        # The error says which collective of which domain failed and the likely cause.
        assert "all_reduce" in message and "communication domain" in message, message
        assert "peer rank died" in message and f"{PG_TIMEOUT:g} s" in message, message
        assert codes[r] == 0, codes
    print(f"\nws={ws} victim={victim} {phase} ({path}) {how}:\n  " + "\n  ".join(report))
