"""One rank alone passes a bad argument (TP=2, fresh gloo processes): it raises at once, before
any collective, while its peer, already inside the all-reduce, waits the group's timeout
(``tp_layers.init_tp(timeout=...)``) and then gets a clear RuntimeError. If the failing rank
catches its error and issues another collective on the group, that call pairs with the peer's
pending one and the peer silently sums the wrong tensors: what the README's reliability section
warns about, measured here."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from test_rank_failure import K, _context, _free_port, _fresh_row_layer

PG_TIMEOUT = 3.0
SLACK = 10.0
ROOT = Path(__file__).resolve().parent.parent


def _worker(rank: int, port: int, mode: str, conn) -> None:
    try:
        import torch

        import tp_layers as tl

        layer, w, g = _fresh_row_layer(rank, 2, port, PG_TIMEOUT, bias=False)
        x = torch.randn(1, K, generator=g)
        mine = x[:, rank * K // 2 : (rank + 1) * K // 2]
        with torch.no_grad(), tl.phase("decode"):
            layer(mine)  # a healthy pass: the connections are up
            torch.distributed.barrier()
            t0 = time.monotonic()
            try:
                if rank == 1:
                    layer(torch.randn(1, K // 2 + 1))  # the bad argument: wrong k
                y = layer(mine)
                outcome = ("ok", "", "", bool(torch.allclose(y, x @ w.T, atol=1e-4)))
            except Exception as e:
                outcome = ("error", type(e).__name__, str(e), None)
                if rank == 1 and mode == "retry":  # catches it, goes on to its next input
                    layer(torch.randn(1, K // 2))
            conn.send((rank, time.monotonic() - t0, outcome))
            if rank == 1:
                time.sleep(PG_TIMEOUT + 3.0)  # alive, but in no collective: only the timeout helps
    except BaseException as e:
        conn.send((rank, -1.0, ("setup failed", type(e).__name__, str(e), None)))
    os._exit(0)


def _run(mode: str) -> dict[int, tuple]:
    ctx = _context()
    port = _free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
    procs = [
        ctx.Process(target=_worker, args=(r, port, mode, w), daemon=True)
        for r, (_, w) in enumerate(pipes)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple] = {}
    try:
        for r, (rd, _) in enumerate(pipes):
            if not rd.poll(120 + PG_TIMEOUT + SLACK):
                pytest.fail(f"rank {r} reported nothing")
            rank, elapsed, outcome = rd.recv()
            got[rank] = (elapsed, *outcome)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert not [g for g in got.values() if g[1] == "setup failed"], got
    return got


def test_the_bad_rank_raises_at_once_its_peer_after_the_timeout() -> None:
    got = _run("give up")
    t1, status1, type1, msg1, _ = got[1]
    t0, status0, type0, msg0, _ = got[0]
    print(f"\nrank 1: {type1} after {t1:.2f}s: {msg1}\nrank 0: {type0} after {t0:.2f}s: {msg0}")
    assert status1 == "error" and type1 == "ValueError" and t1 < 1.0, got[1]
    assert "input last dim" in msg1 and str(K // 2 + 1) in msg1, msg1  # the argument, its size
    assert status0 == "error" and type0 == "RuntimeError", got[0]
    assert 0.8 * PG_TIMEOUT < t0 < PG_TIMEOUT + SLACK, t0
    assert f"{PG_TIMEOUT:g} s" in msg0 and "all_reduce" in msg0, msg0


def test_a_rank_that_carries_on_after_the_error_corrupts_its_peer() -> None:
    got = _run("retry")
    _, status0, _, _, correct0 = got[0]
    assert status0 == "ok" and correct0 is False, got[0]  # paired with the wrong call: no error


def test_readme_documents_it() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Reliability\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README has no '## Reliability' section"
    sec = " ".join(m.group(1).replace("**", "").split())
    assert "init_tp(timeout=" in sec and "TP_TIMEOUT" in sec
    assert "must not issue further collectives" in sec
