"""The MC2 overlap model (bench/overlap.py) against the vendor's published cases (pure Python)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import overlap


def test_calibration_is_the_recorded_constant() -> None:
    assert overlap.calibrate() == overlap.DEFAULT_PARAMS


def test_case1_within_5_points_of_published_range() -> None:
    c = overlap.CASES[0]
    p = overlap.predict(c.m, c.mm_us, c.comm_us)
    assert c.unfused_us == pytest.approx(1913.0)
    assert 26.0 - 5.0 <= p.speedup_pct <= 34.0 + 5.0, p
    assert len(p.chunks) <= overlap.MAX_ROUNDS and len(set(p.chunks)) <= 2


def test_case2_vendor_chunking_and_time() -> None:
    c = overlap.CASES[1]
    assert c.unfused_us == pytest.approx(1874.0)
    fixed = overlap.predict(c.m, c.mm_us, c.comm_us, chunks=c.chunks)
    published = 100.0 * (1 - 1262.0 / 1874.0)  # 32.7 %
    assert abs(fixed.speedup_pct - published) <= 5.0, fixed
    # the model's own best chunking is the vendor's: comm-bound, short chunk first
    best = overlap.predict(c.m, c.mm_us, c.comm_us)
    assert best.chunks == c.chunks


def test_no_split_below_two_aligned_chunks() -> None:
    for m in (1, 16, 64, 128, 255):
        p = overlap.predict(m, 100.0, 100.0)
        assert p.chunks == (m,) and p.fused_us == pytest.approx(p.unfused_us)


def test_chunkings_obey_kernel_rules() -> None:
    for m in (256, 1000, 4096):
        for short_first in (True, False):
            for c in overlap.candidate_chunkings(m, short_first):
                assert sum(c) == m and len(c) <= overlap.MAX_ROUNDS and len(set(c)) <= 2
                long_len = max(c)
                assert long_len % overlap.ROW_ALIGN == 0 or len(c) == 1


def test_perfect_overlap_bounds() -> None:
    # fused can never beat max(mm, comm) nor lose to the serial sum
    for mm, comm in ((888.0, 1025.0), (1500.0, 300.0), (50.0, 900.0)):
        p = overlap.predict(4096, mm, comm)
        assert max(mm, comm) <= p.fused_us <= mm + comm + 1e-6


def test_cost_models_match_case1_order_of_magnitude() -> None:
    c = overlap.CASES[0]
    assert overlap.allreduce_us(c.m, c.n) == pytest.approx(1070.6, abs=1.0)
    assert 0.5 < c.mm_us / overlap.matmul_us(c.m, c.n, c.k) < 2.0
    assert overlap.allreduce_us(1, 16) == pytest.approx(18.0 * 1.15)


def test_threshold_table_never_pays_below_256_rows() -> None:
    for row in overlap.threshold_table(ms=(1, 16, 64, 128, 256, 1024, 4096)):
        for m in (1, 16, 64, 128):
            assert row["speedup_pct"][m] == 0.0
        assert row["pays_from_m"] is None or row["pays_from_m"] >= 256
