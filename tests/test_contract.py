"""CONTRACT.md, rule by rule: one or more violating calls per checkable rule (C1-C10, C12, C13,
Q1-Q9), each asserting the exception type, the argument named and the rule id cited
("<arg>: <msg> (<rule>)"), on 1 rank in-process and on 2 / 4 gloo ranks (raised on every rank
before any collective; the ranks stay in step for the next valid collective)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mp_harness import run_ranks

import ascend_ops as ao
from ascend_ops import layout, trans_quant_param
from ascend_ops._validate import check_mm_all_reduce_base
from ascend_ops.op import _mm_all_reduce_base_op

BF, FP16, F32 = torch.bfloat16, torch.float16, torch.float32
I8 = torch.int8
M, K, N = 4, 64, 8
DOMAIN = "<domain>"  # replaced by ao.hcom_name() at call time (works at any world size)
BIG = 2**31  # INT_MAX + 1
QBIG = 70000  # > 65535

CHECKABLE = {f"C{i}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13)} | {
    f"Q{i}" for i in range(1, 10)
}
NOT_CHECKABLE = {"C11", "C14"}


# ----------------------------------------------------------------------------- builders
def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def fp(m: int = M, k: int = K, n: int = N, dt: torch.dtype = BF, **kw) -> dict:
    g = _g()
    d = dict(x1=torch.randn(m, k, generator=g).to(dt), x2=torch.randn(k, n, generator=g).to(dt))
    d["hcom"] = DOMAIN
    d.update(kw)
    return d


def w8a16(m: int = M, k: int = K, n: int = N, dt: torch.dtype = BF, **kw) -> dict:
    g = _g()
    d = dict(
        x1=torch.randn(m, k, generator=g).to(dt),
        x2=torch.randint(-128, 128, (k, n), generator=g, dtype=I8),
        hcom=DOMAIN,
        antiquant_scale=(torch.rand(n, generator=g) * 0.01 + 0.001).to(dt),
    )
    d.update(kw)
    return d


def w8a8(m: int = M, k: int = K, n: int = N, dequant: str = "bf16", **kw) -> dict:
    """dequant: "bf16" (bf16 output), "packed" (int64, fp16 output), "fp32" (+ pertoken)."""
    g = _g()
    s = torch.rand(n, generator=g) * 1e-3 + 1e-4
    d = dict(
        x1=torch.randint(-128, 128, (m, k), generator=g, dtype=I8),
        x2=torch.randint(-128, 128, (k, n), generator=g, dtype=I8),
        hcom=DOMAIN,
    )
    if dequant == "bf16":
        d["dequant_scale"] = s.to(BF)
    elif dequant == "packed":
        d["dequant_scale"] = trans_quant_param(s)
    else:
        d["dequant_scale"] = s
        d["pertoken_scale"] = torch.rand(m, generator=g) + 0.5
    d.update(kw)
    return d


def meta(*shape: int, dt: torch.dtype = BF) -> torch.Tensor:
    """A tensor of any size without memory: validation reads metadata only."""
    return torch.empty(shape, dtype=dt, device="meta")


def wide(k: int, n: int, dt: torch.dtype = I8) -> torch.Tensor:
    """A (k, n) weight backed by one row (zero row stride): x2 need not be contiguous (C2)."""
    return torch.zeros(1, n, dtype=dt).expand(k, n)


def rg(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_()


# ----------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    rule: str
    exc: type[Exception]
    arg: str
    build: Callable[[], dict]

    def pattern(self) -> str:
        return rf"^{re.escape(self.arg)}: .*\({self.rule}\)$"


R = Row
ROWS: list[Row] = [
    # C1 x1
    R("x1-float64", "C1", TypeError, "x1", lambda: fp(dt=torch.float64)),
    R("x1-int32", "C1", TypeError, "x1", lambda: fp(x1=torch.ones(M, K, dtype=torch.int32))),
    R("x1-not-tensor", "C1", TypeError, "x1", lambda: fp(x1=[[1.0] * K] * M)),
    R("x1-1d", "C1", ValueError, "x1", lambda: fp(x1=torch.randn(K).to(BF))),
    R("x1-4d", "C1", ValueError, "x1", lambda: fp(x1=torch.randn(2, 2, 2, K).to(BF))),
    R("x1-transposed", "C1", ValueError, "x1", lambda: fp(x1=torch.randn(K, M).to(BF).t())),
    # C2 x2
    R("x2-3d", "C2", ValueError, "x2", lambda: fp(x2=torch.randn(1, K, N).to(BF))),
    R("x2-1d", "C2", ValueError, "x2", lambda: fp(x2=torch.randn(K).to(BF))),
    R("x2-float64", "C2", TypeError, "x2", lambda: fp(x2=torch.randn(K, N, dtype=torch.float64))),
    R("x2-dtype-mismatch", "C2", TypeError, "x2", lambda: fp(x2=torch.randn(K, N).to(FP16))),
    R("x2-fp32-with-bf16", "C2", TypeError, "x2", lambda: fp(x2=torch.randn(K, N))),
    R("x2-float-with-int8-x1", "C2", TypeError, "x2", lambda: w8a8(x2=torch.randn(K, N).to(BF))),
    R("x2-not-tensor", "C2", TypeError, "x2", lambda: fp(x2=None)),
    R("x2-other-device", "C2", ValueError, "x2", lambda: fp(x2=meta(K, N))),
    # C3 k axes
    R("k-mismatch", "C3", ValueError, "x2", lambda: fp(x2=torch.randn(K + 1, N).to(BF))),
    R("k-mismatch-3d", "C3", ValueError, "x2", lambda: fp(x1=torch.randn(2, 2, K - 1).to(BF))),
    R("k-mismatch-nk-view", "C3", ValueError, "x2", lambda: fp(x2=torch.randn(K, N).to(BF).t())),
    # C4 hcom
    R("hcom-int", "C4", TypeError, "hcom", lambda: fp(hcom=0)),
    R("hcom-none", "C4", TypeError, "hcom", lambda: fp(hcom=None)),
    R("hcom-empty", "C4", TypeError, "hcom", lambda: fp(hcom="")),
    R("hcom-unknown", "C4", ValueError, "hcom", lambda: fp(hcom="no-such-domain")),
    # C5
    R("reduce-max", "C5", ValueError, "reduce_op", lambda: fp(reduce_op="max")),
    R("reduce-SUM", "C5", ValueError, "reduce_op", lambda: fp(reduce_op="SUM")),
    # C6 bias
    R("bias-fp32-in-bf16", "C6", TypeError, "bias", lambda: fp(bias=torch.zeros(N))),
    R("bias-int32-in-fp", "C6", TypeError, "bias", lambda: fp(bias=torch.zeros(N, dtype=torch.int32))),
    R("bias-bf16-in-w8a16-fp16", "C6", TypeError, "bias", lambda: w8a16(dt=FP16, bias=torch.zeros(N).to(BF))),
    R("bias-bf16-in-w8a8", "C6", TypeError, "bias", lambda: w8a8(bias=torch.zeros(N).to(BF))),
    R("bias-length", "C6", ValueError, "bias", lambda: fp(bias=torch.zeros(N + 1).to(BF))),
    R("bias-2d", "C6", ValueError, "bias", lambda: fp(bias=torch.zeros(1, N).to(BF))),
    R("bias-w8a8-length", "C6", ValueError, "bias", lambda: w8a8(bias=torch.zeros(K, dtype=torch.int32))),
    R("bias-not-tensor", "C6", TypeError, "bias", lambda: fp(bias=[0.0] * N)),
    # C7 x3
    R("x3-dtype", "C7", TypeError, "x3", lambda: fp(x3=torch.zeros(M, N))),
    R("x3-dtype-w8a8-bf16-out", "C7", TypeError, "x3", lambda: w8a8(x3=torch.zeros(M, N).to(FP16))),
    R("x3-dtype-w8a8-fp16-out", "C7", TypeError, "x3", lambda: w8a8(dequant="packed", x3=torch.zeros(M, N).to(BF))),
    R("x3-shape", "C7", ValueError, "x3", lambda: fp(x3=torch.zeros(M, N + 1).to(BF))),
    R("x3-2d-for-3d-x1", "C7", ValueError, "x3", lambda: fp(x1=torch.randn(2, 2, K).to(BF), x3=torch.zeros(4, N).to(BF))),
    R("x3-not-tensor", "C7", TypeError, "x3", lambda: fp(x3=0.0)),
    # C8
    R("comm-turn-1", "C8", ValueError, "comm_turn", lambda: fp(comm_turn=1)),
    R("comm-turn-bool", "C8", ValueError, "comm_turn", lambda: fp(comm_turn=False)),
    R("comm-turn-float", "C8", ValueError, "comm_turn", lambda: fp(comm_turn=0.0)),
    # C10 (under grad mode; the table runs with grad enabled)
    R("grad-x1", "C10", ValueError, "x1", lambda: fp(dt=F32, x1=rg(torch.randn(M, K)))),
    R("grad-x2", "C10", ValueError, "x2", lambda: fp(x2=rg(torch.randn(K, N).to(BF)))),
    R("grad-bias", "C10", ValueError, "bias", lambda: fp(bias=rg(torch.zeros(N).to(BF)))),
    R("grad-x3", "C10", ValueError, "x3", lambda: fp(x3=rg(torch.zeros(M, N).to(BF)))),
    R("grad-antiquant-scale", "C10", ValueError, "antiquant_scale", lambda: w8a16(antiquant_scale=rg(torch.ones(N).to(BF)))),
    R("grad-antiquant-offset", "C10", ValueError, "antiquant_offset", lambda: w8a16(antiquant_offset=rg(torch.ones(N).to(BF)))),
    R("grad-dequant-scale", "C10", ValueError, "dequant_scale", lambda: w8a8(dequant="fp32", dequant_scale=rg(torch.ones(N)))),
    R("grad-pertoken-scale", "C10", ValueError, "pertoken_scale", lambda: w8a8(dequant="fp32", pertoken_scale=rg(torch.ones(M)))),
    R("grad-comm-quant-scale", "C10", ValueError, "comm_quant_scale_1", lambda: w8a8(comm_quant_scale_1=rg(torch.ones(N).to(BF)), comm_quant_scale_2=torch.ones(N).to(BF))),
    # C12 (empty; the world-size part runs on a 3-rank sub-group below)
    R("x1-empty-m", "C12", ValueError, "x1", lambda: fp(m=0)),
    R("x1-empty-k", "C12", ValueError, "x1", lambda: fp(k=0)),
    R("x1-empty-3d", "C12", ValueError, "x1", lambda: fp(x1=torch.zeros(0, 3, K).to(BF))),
    R("x2-empty-n", "C12", ValueError, "x2", lambda: fp(n=0)),
    R("w8a8-x2-empty-n", "C12", ValueError, "x2", lambda: w8a8(n=0)),
    # C13: meta tensors (no memory; x1 must be contiguous, so an expanded x1 would trip C1)
    R("m-2^31", "C13", ValueError, "x1", lambda: fp(x1=meta(BIG, 1), x2=meta(1, 1))),
    R("m-2^31-3d", "C13", ValueError, "x1", lambda: fp(x1=meta(2**16, 2**15, 1), x2=meta(1, 1))),
    R("k-2^31", "C13", ValueError, "x1", lambda: fp(x1=meta(1, BIG), x2=meta(BIG, 1))),
    R("n-2^31", "C13", ValueError, "x2", lambda: fp(x1=meta(1, 1), x2=meta(1, BIG))),
    R("m-2^31-w8a16", "C13", ValueError, "x1", lambda: w8a16(x1=meta(BIG, 1), x2=meta(1, 1, dt=I8), antiquant_scale=meta(1))),
    # Q1 antiquant_scale
    R("w8a16-no-scale", "Q1", ValueError, "antiquant_scale", lambda: w8a16(antiquant_scale=None)),
    R("w8a16-scale-dtype", "Q1", TypeError, "antiquant_scale", lambda: w8a16(antiquant_scale=torch.ones(N).to(FP16))),
    R("w8a16-scale-fp32", "Q1", TypeError, "antiquant_scale", lambda: w8a16(antiquant_scale=torch.ones(N))),
    R("w8a16-scale-not-tensor", "Q1", TypeError, "antiquant_scale", lambda: w8a16(antiquant_scale=1.0)),
    R("w8a16-scale-length", "Q1", ValueError, "antiquant_scale", lambda: w8a16(antiquant_scale=torch.ones(N + 1).to(BF))),
    R("w8a16-scale-2xn-no-group", "Q1", ValueError, "antiquant_scale", lambda: w8a16(antiquant_scale=torch.ones(2, N).to(BF))),
    R("w8a16-scale-nx1", "Q1", ValueError, "antiquant_scale", lambda: w8a16(antiquant_scale=torch.ones(N, 1).to(BF))),
    R("w8a16-group-rows", "Q1", ValueError, "antiquant_scale", lambda: w8a16(k=128, antiquant_group_size=32, antiquant_scale=torch.ones(3, N).to(BF))),
    R("w8a16-group-partial-rows", "Q1", ValueError, "antiquant_scale", lambda: w8a16(k=100, antiquant_group_size=32, antiquant_scale=torch.ones(3, N).to(BF))),
    R("w8a16-group-per-channel-shape", "Q1", ValueError, "antiquant_scale", lambda: w8a16(k=128, antiquant_group_size=32)),
    R("antiquant-scale-in-fp", "Q1", ValueError, "antiquant_scale", lambda: fp(antiquant_scale=torch.ones(N).to(BF))),
    R("antiquant-scale-in-w8a8", "Q1", ValueError, "antiquant_scale", lambda: w8a8(antiquant_scale=torch.ones(N).to(BF))),
    # Q2 antiquant_offset
    R("w8a16-offset-dtype", "Q2", TypeError, "antiquant_offset", lambda: w8a16(antiquant_offset=torch.ones(N).to(FP16))),
    R("w8a16-offset-shape", "Q2", ValueError, "antiquant_offset", lambda: w8a16(antiquant_offset=torch.ones(1, N).to(BF))),
    R("w8a16-offset-group-shape", "Q2", ValueError, "antiquant_offset", lambda: w8a16(k=128, antiquant_group_size=32, antiquant_scale=torch.ones(4, N).to(BF), antiquant_offset=torch.ones(3, N).to(BF))),
    R("w8a16-offset-not-tensor", "Q2", TypeError, "antiquant_offset", lambda: w8a16(antiquant_offset=0.0)),
    R("antiquant-offset-in-fp", "Q2", ValueError, "antiquant_offset", lambda: fp(antiquant_offset=torch.ones(N).to(BF))),
    R("antiquant-offset-in-w8a8", "Q2", ValueError, "antiquant_offset", lambda: w8a8(antiquant_offset=torch.ones(N).to(BF))),
    # Q3 antiquant_group_size
    R("group-48", "Q3", ValueError, "antiquant_group_size", lambda: w8a16(k=128, antiquant_group_size=48, antiquant_scale=torch.ones(3, N).to(BF))),
    R("group-16", "Q3", ValueError, "antiquant_group_size", lambda: w8a16(k=128, antiquant_group_size=16, antiquant_scale=torch.ones(8, N).to(BF))),
    R("group-negative", "Q3", ValueError, "antiquant_group_size", lambda: w8a16(antiquant_group_size=-32)),
    R("group-equals-k", "Q3", ValueError, "antiquant_group_size", lambda: w8a16(k=64, antiquant_group_size=64, antiquant_scale=torch.ones(1, N).to(BF))),
    R("group-above-k", "Q3", ValueError, "antiquant_group_size", lambda: w8a16(k=64, antiquant_group_size=96, antiquant_scale=torch.ones(1, N).to(BF))),
    R("group-not-int", "Q3", TypeError, "antiquant_group_size", lambda: w8a16(antiquant_group_size=32.0)),
    R("group-in-fp", "Q3", ValueError, "antiquant_group_size", lambda: fp(antiquant_group_size=32)),
    R("group-in-w8a8", "Q3", ValueError, "antiquant_group_size", lambda: w8a8(antiquant_group_size=32)),
    # Q4 W8A16 sizes: zero-stride x2 (a few hundred KB at most)
    R("w8a16-k-65536", "Q4", ValueError, "x2", lambda: w8a16(m=1, x1=torch.zeros(1, QBIG).to(BF), x2=wide(QBIG, N), antiquant_scale=torch.ones(1).to(BF))),
    R("w8a16-n-65536", "Q4", ValueError, "x2", lambda: w8a16(m=1, x2=wide(K, QBIG), antiquant_scale=torch.ones(1).to(BF))),
    # Q5 dequant_scale
    R("w8a8-no-dequant", "Q5", ValueError, "dequant_scale", lambda: w8a8(dequant_scale=None)),
    R("w8a8-dequant-fp16", "Q5", TypeError, "dequant_scale", lambda: w8a8(dequant_scale=torch.ones(N).to(FP16))),
    R("w8a8-dequant-int32", "Q5", TypeError, "dequant_scale", lambda: w8a8(dequant_scale=torch.ones(N, dtype=torch.int32))),
    R("w8a8-dequant-not-tensor", "Q5", TypeError, "dequant_scale", lambda: w8a8(dequant_scale=1.0)),
    R("w8a8-dequant-length", "Q5", ValueError, "dequant_scale", lambda: w8a8(dequant_scale=torch.ones(N + 1).to(BF))),
    R("w8a8-dequant-2xn", "Q5", ValueError, "dequant_scale", lambda: w8a8(dequant_scale=torch.ones(2, N).to(BF))),
    R("w8a8-dequant-packed-shape", "Q5", ValueError, "dequant_scale", lambda: w8a8(dequant_scale=trans_quant_param(torch.ones(N - 1)))),
    R("dequant-in-fp", "Q5", ValueError, "dequant_scale", lambda: fp(dequant_scale=torch.ones(N).to(BF))),
    R("dequant-in-w8a16", "Q5", ValueError, "dequant_scale", lambda: w8a16(dequant_scale=torch.ones(N).to(BF))),
    # Q6 pertoken_scale
    R("pertoken-bf16", "Q6", TypeError, "pertoken_scale", lambda: w8a8(pertoken_scale=torch.ones(M).to(BF))),
    R("pertoken-fp16", "Q6", TypeError, "pertoken_scale", lambda: w8a8(dequant="fp32", pertoken_scale=torch.ones(M).to(FP16))),
    R("pertoken-length", "Q6", ValueError, "pertoken_scale", lambda: w8a8(dequant="fp32", pertoken_scale=torch.ones(M + 1))),
    R("pertoken-2d", "Q6", ValueError, "pertoken_scale", lambda: w8a8(dequant="fp32", pertoken_scale=torch.ones(M, 1))),
    R("pertoken-3d-x1-bs-shape", "Q6", ValueError, "pertoken_scale", lambda: w8a8(dequant="fp32", x1=torch.zeros(2, 2, K, dtype=I8), pertoken_scale=torch.ones(2, 2))),
    R("pertoken-with-packed-int64", "Q6", TypeError, "dequant_scale", lambda: w8a8(dequant="packed", pertoken_scale=torch.ones(M))),
    R("pertoken-with-packed-uint64", "Q6", TypeError, "dequant_scale", lambda: w8a8(dequant="packed", dequant_scale=trans_quant_param(torch.ones(N)).view(torch.uint64), pertoken_scale=torch.ones(M))),
    R("pertoken-in-fp", "Q6", ValueError, "pertoken_scale", lambda: fp(pertoken_scale=torch.ones(M))),
    R("pertoken-in-w8a16", "Q6", ValueError, "pertoken_scale", lambda: w8a16(pertoken_scale=torch.ones(M))),
    # Q7 W8A8 sizes
    R("w8a8-k-65536", "Q7", ValueError, "x1", lambda: w8a8(m=1, x1=torch.zeros(1, QBIG, dtype=I8), x2=wide(QBIG, N))),
    R("w8a8-n-65536-nd", "Q7", ValueError, "x2", lambda: w8a8(m=1, x2=wide(K, QBIG), dequant_scale=torch.ones(1).to(BF))),
    # Q8 comm quant
    R("cq-only-1", "Q8", ValueError, "comm_quant_scale_2", lambda: w8a8(comm_quant_scale_1=torch.ones(N).to(BF))),
    R("cq-only-2", "Q8", ValueError, "comm_quant_scale_1", lambda: w8a8(comm_quant_scale_2=torch.ones(N).to(BF))),
    R("cq-in-fp", "Q8", ValueError, "comm_quant_scale_1", lambda: fp(comm_quant_scale_1=torch.ones(N).to(BF), comm_quant_scale_2=torch.ones(N).to(BF))),
    R("cq-in-w8a16", "Q8", ValueError, "comm_quant_scale_2", lambda: w8a16(comm_quant_scale_2=torch.ones(N).to(BF))),
    R("cq-dtype", "Q8", TypeError, "comm_quant_scale_1", lambda: w8a8(comm_quant_scale_1=torch.ones(N).to(FP16), comm_quant_scale_2=torch.ones(N).to(FP16))),
    R("cq-dtype-2", "Q8", TypeError, "comm_quant_scale_2", lambda: w8a8(comm_quant_scale_1=torch.ones(N).to(BF), comm_quant_scale_2=torch.ones(N))),
    R("cq-dtype-fp16-out", "Q8", TypeError, "comm_quant_scale_1", lambda: w8a8(dequant="packed", comm_quant_scale_1=torch.ones(N).to(BF), comm_quant_scale_2=torch.ones(N).to(BF))),
    R("cq-shape", "Q8", ValueError, "comm_quant_scale_1", lambda: w8a8(comm_quant_scale_1=torch.ones(N + 1).to(BF), comm_quant_scale_2=torch.ones(N + 1).to(BF))),
    R("cq-shape-2xn", "Q8", ValueError, "comm_quant_scale_2", lambda: w8a8(comm_quant_scale_1=torch.ones(N).to(BF), comm_quant_scale_2=torch.ones(2, N).to(BF))),
    R("cq-shape-mismatch", "Q8", ValueError, "comm_quant_scale_2", lambda: w8a8(comm_quant_scale_1=torch.ones(N).to(BF), comm_quant_scale_2=torch.ones(1, N).to(BF))),
    R("cq-not-tensor", "Q8", TypeError, "comm_quant_scale_1", lambda: w8a8(comm_quant_scale_1=1.0, comm_quant_scale_2=torch.ones(N).to(BF))),
    # Q9
    R("fp32-dequant-unpacked", "Q9", TypeError, "dequant_scale", lambda: w8a8(dequant_scale=torch.ones(N))),
    R("fp32-dequant-unpacked-tensor", "Q9", TypeError, "dequant_scale", lambda: w8a8(dequant_scale=torch.ones(1))),
]  # fmt: skip
ROWS_BY_ID = {r.id: r for r in ROWS}


@dataclasses.dataclass(frozen=True)
class OutRow:
    """C9 is not a constraint on a call but on the result: rows check the output's shape and
    dtype (OpSpec, the eager result and the fake kernel used by torch.compile)."""

    id: str
    build: Callable[[], dict]
    shape: tuple[int, ...]
    dtype: torch.dtype
    rule: str = "C9"


OUT_ROWS = [
    OutRow("fp-2d", lambda: fp(), (M, N), BF),
    OutRow("fp-3d", lambda: fp(x1=torch.randn(2, 3, K).to(BF)), (2, 3, N), BF),
    OutRow("fp32-portable", lambda: fp(dt=F32), (M, N), F32),
    OutRow("w8a16-fp16", lambda: w8a16(dt=FP16), (M, N), FP16),
    OutRow("w8a8-packed", lambda: w8a8(dequant="packed"), (M, N), FP16),
    OutRow("w8a8-bf16", lambda: w8a8(x1=torch.zeros(1, 5, K, dtype=I8)), (1, 5, N), BF),
    OutRow("w8a8-fp32-pertoken", lambda: w8a8(dequant="fp32"), (M, N), FP16),
    OutRow(
        "w8a8-bf16-pertoken",
        lambda: w8a8(pertoken_scale=torch.ones(M)),
        (M, N),
        BF,
    ),
]


def _call(args: dict) -> torch.Tensor:
    args = dict(args)
    if args.get("hcom") == DOMAIN:
        args["hcom"] = ao.hcom_name()
    x1, x2, hcom = args.pop("x1"), args.pop("x2"), args.pop("hcom")
    return ao.mm_all_reduce_base(x1, x2, hcom, **args)


# ----------------------------------------------------------------------------- 1 rank
@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.rule}-{r.id}")
def test_violation_is_named(row: Row) -> None:
    args = row.build()  # build first: requires_grad_ works in any mode
    with torch.enable_grad(), pytest.raises(row.exc, match=row.pattern()) as info:
        _call(args)
    assert type(info.value) is row.exc  # not a subclass (e.g. a torch error)


@pytest.mark.parametrize("row", OUT_ROWS, ids=lambda r: r.id)
def test_output_spec(row: OutRow) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = row.build()
    spec = check_mm_all_reduce_base(**{**args, "hcom": "local"})
    assert (spec.out_shape, spec.out_dtype) == (row.shape, row.dtype)
    out = _call(args)
    assert (tuple(out.shape), out.dtype) == (row.shape, row.dtype)
    names = [
        "x1", "x2", "hcom", "reduce_op", "bias", "antiquant_scale", "antiquant_offset", "x3",
        "dequant_scale", "pertoken_scale", "comm_quant_scale_1", "comm_quant_scale_2",
        "comm_turn", "antiquant_group_size",
    ]  # fmt: skip
    defaults = {"hcom": "local", "reduce_op": "sum", "comm_turn": 0, "antiquant_group_size": 0}
    with FakeTensorMode() as mode:
        pos = []
        for name in names:
            v = args.get(name, defaults.get(name))
            if name == "hcom":
                v = "local"
            pos.append(mode.from_tensor(v) if isinstance(v, torch.Tensor) else v)
        fake = _mm_all_reduce_base_op(*pos)
    assert (tuple(fake.shape), fake.dtype) == (row.shape, row.dtype)


def test_grad_is_fine_without_grad_mode() -> None:
    """C10 forbids a backward, not tensors that happen to require grad under no_grad."""
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(K, N)
    with torch.no_grad():
        out = ao.mm_all_reduce_base(x, w, ao.hcom_name())
    with torch.inference_mode():
        out2 = ao.mm_all_reduce_base(x, w, ao.hcom_name())
    assert not out.requires_grad and torch.equal(out, out2)


def test_boundaries_that_are_allowed() -> None:
    """The edges of Q3 / Q7 are accepted (validation only: no big compute)."""
    # Q3: group size k - 1 rounded down to a multiple of 32 (k = 97 -> 96 allowed)
    a = w8a16(k=97, antiquant_group_size=96, antiquant_scale=torch.ones(2, N).to(BF))
    check_mm_all_reduce_base(**{**a, "hcom": "local"})
    # Q7: n > 65535 is allowed for the transposed view of a contiguous (n, k) weight
    x2 = torch.zeros(QBIG, 16, dtype=I8).t()
    b = w8a8(m=1, k=16, x2=x2, dequant_scale=torch.ones(1).to(BF))
    spec = check_mm_all_reduce_base(**{**b, "hcom": "local"})
    assert spec.out_shape == (1, QBIG)
    # C13 / Q4: the largest W8A16 sizes pass (metadata only)
    c = w8a16(m=1, x1=meta(1, 65535), x2=meta(65535, 65535, dt=I8), antiquant_scale=meta(1))
    check_mm_all_reduce_base(**{**c, "hcom": "local"})


def _rules_in_contract() -> set[str] | None:
    p = Path("/work/shared/spec/CONTRACT.md")
    if not p.exists():
        return None
    return set(re.findall(r"^- ([CQ]\d+) ", p.read_text(), flags=re.M))


def test_table_covers_every_checkable_rule() -> None:
    covered = {r.rule for r in ROWS} | {r.rule for r in OUT_ROWS} | {WORLD_SIZE_RULE}
    assert covered == CHECKABLE, sorted(CHECKABLE ^ covered)
    import ascend_ops._validate as v

    for rule in NOT_CHECKABLE:  # documented as capabilities / whole-model properties
        assert re.search(rf"^- {rule} ", v.__doc__, flags=re.M), rule
    in_contract = _rules_in_contract()
    if in_contract is not None:
        assert in_contract == CHECKABLE | NOT_CHECKABLE
    assert len(CHECKABLE) == 21


# ----------------------------------------------------------------------------- Ascend only
def test_ascend_refuses_fp32_x1_before_the_kernel(torch_npu_double) -> None:
    with ao.use_backend("ascend"):
        for x1, x2, arg in (
            (torch.randn(M, K), torch.randn(K, N), "x1"),
            (torch.randn(M, K), torch.randint(-8, 8, (K, N), dtype=I8), "x1"),
            (torch.randn(M, K).to(BF), torch.randn(K, N), "x2"),
        ):
            rule = "C1" if arg == "x1" else "C2"
            with pytest.raises(TypeError, match=rf"^{arg}: .*on the Ascend backend.*\({rule}\)$"):
                ao.mm_all_reduce_base(x1, x2, "hccl_world_size_1")
    assert torch_npu_double.calls_named("npu_mm_all_reduce_base") == []


def test_ascend_refuses_nz_weight_in_fp_before_the_kernel(torch_npu_double) -> None:
    with ao.use_backend("ascend"):
        w = layout.format_cast(torch.randn(K, N).to(BF), layout.FORMAT_NZ)
        assert layout.get_format(w) == layout.FORMAT_NZ
        with pytest.raises(ValueError, match=r"^x2: .*FRACTAL_NZ.*\(C2\)$"):
            ao.mm_all_reduce_base(torch.randn(M, K).to(BF), w, "hccl_world_size_1")
        # the same NZ storage is fine in the quantized scenarios (validation only here)
        wq = layout.format_cast(torch.randint(-8, 8, (K, N), dtype=I8), layout.FORMAT_NZ)
        a = w8a16(x2=wq)
        check_mm_all_reduce_base(**{**a, "hcom": "h"}, ascend=True, x2_format=layout.FORMAT_NZ)
    assert torch_npu_double.calls_named("npu_mm_all_reduce_base") == []


# ----------------------------------------------------------------------------- multi-rank
MULTI_RANK_ROWS = [
    "x1-float64", "x1-transposed", "x2-dtype-mismatch", "x2-float-with-int8-x1", "k-mismatch",
    "hcom-int", "hcom-unknown", "reduce-max", "bias-bf16-in-w8a8", "x3-shape", "comm-turn-1",
    "grad-x2", "x1-empty-m", "m-2^31", "w8a16-group-rows", "w8a16-offset-dtype", "group-48",
    "w8a16-n-65536", "w8a8-no-dequant", "pertoken-with-packed-int64", "w8a8-k-65536",
    "cq-shape-mismatch", "fp32-dequant-unpacked",
]  # fmt: skip
WORLD_SIZE_RULE = "C12"


def _valid_collective(rank: int, ws: int, hcom: str) -> None:
    x = torch.full((2, 4), float(rank + 1))
    want = torch.full((2, 4), float(ws * (ws + 1) // 2))
    out = ao.mm_all_reduce_base(x, torch.eye(4), hcom)
    assert torch.equal(out, want), (rank, out)
    assert torch.equal(ao.all_reduce(x, hcom), want)


def _violation_then_collective(rank: int, ws: int, row_id: str) -> None:
    """Run the violating call on every rank, then a valid collective (which would hang or
    mismatch if some rank had entered a collective for the bad call); re-raise the error."""
    args = ROWS_BY_ID[row_id].build()
    err: BaseException | None = None
    try:
        with torch.enable_grad():
            _call(args)
    except Exception as e:
        err = e
    _valid_collective(rank, ws, ao.hcom_name())
    if err is None:
        raise AssertionError(f"{row_id}: no error on rank {rank}")
    raise err


@pytest.mark.parametrize("ws", [2, 4])
@pytest.mark.parametrize("row_id", MULTI_RANK_ROWS)
def test_violation_on_every_rank(ws: int, row_id: str) -> None:
    row = ROWS_BY_ID[row_id]
    outcomes = run_ranks(ws, _violation_then_collective, row_id, raise_on_error=False, timeout=60)
    assert len(outcomes) == ws
    for o in outcomes:
        assert not o.ok and o.exc_type == row.exc.__name__, (o.rank, o.exc_type, o.traceback)
        assert re.search(row.pattern(), o.message), (o.rank, o.message)


def _world_size_three(rank: int, ws: int) -> None:
    import torch.distributed as dist

    sub = dist.new_group([0, 1, 2])  # every rank takes part in creating it
    err: BaseException | None = None
    if rank < 3:
        hcom = ao.hcom_name(sub)
        x = torch.ones(2, 4)
        try:
            ao.mm_all_reduce_base(x, torch.eye(4), hcom)
        except ValueError as e:
            err = e
        with pytest.raises(ValueError, match=r"^hcom: .*world size 3.*\(C12\)$"):
            ao.all_reduce(x, hcom)
    _valid_collective(rank, ws, ao.hcom_name())
    if err is not None:
        raise err


def test_world_size_three_is_refused_on_a_sub_group() -> None:
    outcomes = run_ranks(4, _world_size_three, raise_on_error=False, timeout=60)
    for o in outcomes[:3]:
        assert o.exc_type == "ValueError", (o.rank, o.traceback)
        assert re.search(r"^hcom: .*world size 3; supported: 1, 2, 4 or 8 \(C12\)$", o.message)
    assert outcomes[3].ok, outcomes[3].traceback
