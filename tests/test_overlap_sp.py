"""The sequence-parallel overlap model (bench/overlap_sp.py): pure Python, no torch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import overlap, overlap_sp


@pytest.mark.parametrize("kappa", [0.0, 0.2])
def test_pipeline_reproduces_the_all_reduce_simulation(kappa: float) -> None:
    """pipeline_us with overlap.simulate's chunk works is overlap.simulate (one model)."""
    p = overlap.ModelParams(overlap.DEFAULT_PARAMS.fixed_us, kappa)
    for case in overlap.CASES:
        for chunks in (case.chunks or (1024,) * 4, (512, 3584), (case.m,)):
            f, m = p.fixed_us, case.m
            if len(chunks) == 1:
                a, b = [case.mm_us], [case.comm_us]
            else:
                a = [f + (case.mm_us - f) * max(r, 128) / max(m, 128) for r in chunks]
                b = [f + (case.comm_us - f) * r / m for r in chunks]
            want = overlap.simulate(chunks, m, case.mm_us, case.comm_us, p)
            assert overlap_sp.pipeline_us(a, b, kappa) == pytest.approx(want)


def test_pipeline_front_job_and_bounds() -> None:
    # comm 10, 10 ; matmul front 15 then 5, 5: matmul stream 15 -> max(15, 10) + 5 -> max(20, 20) + 5
    assert overlap_sp.pipeline_us([10, 10], [5, 5], second_front=15) == pytest.approx(25)
    assert overlap_sp.pipeline_us([10], [5]) == pytest.approx(15)


def test_comm_model_is_the_full_mesh_fit() -> None:
    """ws = 8: the all-gather of a total buffer costs half the all-reduce fit of that buffer
    (commTimeFactor 2.0 / (8 / ws)); ws = 2: twice it."""
    _, s = overlap._cost_scales()
    for ws, factor in ((8, 0.5), (4, 1.0), (2, 2.0)):
        rows = 4096 // ws
        got = overlap_sp.comm_us("ag", rows, 4096, ws)
        assert got == pytest.approx(overlap.allreduce_us(4096, 4096) * s * factor)


def test_min_tile_and_no_split_for_short_shapes() -> None:
    mt = overlap_sp.min_tile_rows("rs", 4096, 2048, 2)
    assert mt >= 384  # matmul floor for <= 2 blocks
    p = overlap_sp.predict_sp("rs", 2 * (2 * mt - 128), 4096, 2048, 2)
    assert p.chunks == (2 * mt - 128,)
    assert p.fused_us == pytest.approx(p.unfused_us)  # nothing overlaps


def test_predictions_respect_kernel_rules_and_bounds() -> None:
    for kind, m, n, k, ws in (
        ("ag", 1024, 5504, 4096, 4),
        ("rs", 8192, 8192, 2048, 4),
        ("ag", 512, 14336, 8192, 2),
    ):
        p = overlap_sp.predict_sp(kind, m, n, k, ws)
        total = m if kind == "ag" else m // ws
        assert sum(p.chunks) == total and len(p.chunks) <= overlap.MAX_ROUNDS
        assert len(set(p.chunks)) <= 2
        # with kappa = 0 and no growth the fused time is at least the longer stage
        assert p.fused_us >= max(p.mm_us, p.comm_us) - 1e-6
        grown = overlap_sp.predict_sp(kind, m, n, k, ws, grown=True)
        assert grown.fused_us >= p.fused_us - 1e-6


def test_rs_requires_divisible_m() -> None:
    with pytest.raises(ValueError, match=r"\(R8\)"):
        overlap_sp.predict_sp("rs", 1001, 4096, 1024, 4)


def test_table_covers_every_layer_and_tp() -> None:
    rows = overlap_sp.sp_table(tokens=(1024, 4096))
    assert len(rows) == len(overlap_sp.SP_LLM_SHAPES) * 3
    assert {r["kind"] for r in rows} == {"ag", "rs"}
