"""The MC2 overlap model (bench/overlap.py) against the vendor's published cases (pure Python)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ascend_ops import contract
from ascend_ops.contract import MIN_TILE_ROWS
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


def test_threshold_table_never_gains_where_the_kernel_does_not_split() -> None:
    ms = (1, 16, 64, 128, 256, 384, 512, 768, 1024, 4096)
    for row in overlap.threshold_table(ms=ms):
        first = row["kernel_splits_from_m"]
        assert first is not None and first >= MIN_TILE_ROWS
        for m in ms:
            if m < first:
                assert row["speedup_pct"][m] == 0.0 and row["chunks"][m] == [m]
        assert row["pays_from_m"] is None or row["pays_from_m"] >= first


# -- the kernel's tiling rule (ascend_ops.contract) and the phase switch built on it ----------


def _min_tile_by_hand(n: int, k: int, cores: int = 24) -> int:
    """mc2/common/src/matmul_performance.cpp GetLinearThresholdLen for Atlas A2, restated."""
    nn, kk = max(128, n), max(128, k)
    par1 = 4 * 2**30 // 20 * cores
    par2 = 6 * 2**20 // 20 * cores
    return max(3 * 128, par1 // (nn * kk), par2 // (nn * kk // 1024 + nn), 65536 // (n * 2))


@pytest.mark.parametrize(("n", "k"), [(8192, 14336), (4096, 2048), (4096, 512), (8192, 7168)])
def test_min_tile_is_the_vendors(n: int, k: int) -> None:
    assert contract.kernel_min_tile_rows(n, k) == _min_tile_by_hand(n, k)


def test_no_split_below_twice_the_tile_unless_balanced_and_large() -> None:
    assert (contract.MIN_TILE_ROWS, contract.NO_SPLIT_BELOW_ROWS) == (384, 768)
    # 70B down_proj, TP 2: n * k >= 32 Mi but compute-bound (> 2x comm): 768
    n, k = 8192, 14336
    assert contract.kernel_min_tile_rows(n, k) == 384
    assert not contract.kernel_splits_m(767, n, k) and contract.kernel_splits_m(768, n, k)
    # 70B down_proj, TP 4: n * k >= 32 Mi and within 2x: the tile halves, a split from 384
    n, k = 8192, 7168
    mm, comm = contract.matmul_us(384, n, k), contract.allreduce_us(384, n)
    assert max(mm, comm) / min(mm, comm) < 2.0 and n * k >= 32 * 2**20
    assert not contract.kernel_splits_m(383, n, k) and contract.kernel_splits_m(384, n, k)
    # 70B o_proj, TP 4: within 2x but n * k = 16 Mi: no halving
    assert contract.kernel_tile_rows(700, 8192, 2048) == 384
    assert not contract.kernel_splits_m(767, 8192, 2048)
    # 7B o_proj, TP 2: small n * k raises the tile to 614 rows: no split below 1228
    assert contract.kernel_min_tile_rows(4096, 2048) == 614
    assert not contract.kernel_splits_m(1227, 4096, 2048)
    assert contract.kernel_splits_m(1228, 4096, 2048)


def _x(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.bfloat16, device="meta")


def test_phase_follows_the_kernel_rule_per_layer_shape() -> None:
    import tp_layers as tl

    n, k = 4096, 2048
    assert tl.infer_phase(_x(1227, k), n) is tl.Phase.DECODE
    assert tl.infer_phase(_x(1228, k), n) is tl.Phase.PREFILL
    assert tl.infer_phase(_x(384, 7168), 8192) is tl.Phase.PREFILL
    assert tl.infer_phase(_x(767, 14336), 8192) is tl.Phase.DECODE
    # shape unknown: twice the minimum tile
    assert tl.prefill_threshold() == 768
    assert tl.infer_phase(_x(767, k)) is tl.Phase.DECODE
    assert tl.infer_phase(_x(768, k)) is tl.Phase.PREFILL
    # a prompt (s > 1) and an explicit phase win
    assert tl.infer_phase(_x(1, 2, k), n) is tl.Phase.PREFILL
    with tl.phase("decode"):
        assert tl.infer_phase(_x(4096, k), n) is tl.Phase.DECODE


def test_user_threshold_replaces_the_rule_until_reset() -> None:
    import tp_layers as tl

    n, k = 4096, 2048
    try:
        tl.set_prefill_threshold(64)
        assert tl.prefill_threshold() == 64
        assert tl.infer_phase(_x(64, k), n) is tl.Phase.PREFILL
        assert tl.infer_phase(_x(63, k), n) is tl.Phase.DECODE
        tl.set_prefill_threshold(5000)
        assert tl.infer_phase(_x(4096, k), n) is tl.Phase.DECODE
    finally:
        tl.set_prefill_threshold(None)
    assert tl.prefill_threshold() == 768
    assert tl.infer_phase(_x(1228, k), n) is tl.Phase.PREFILL
    for bad in (0, -3, 1.5, True, "64"):
        with pytest.raises(ValueError, match="tokens: must be a positive int or None"):
            tl.set_prefill_threshold(bad)
