"""Measure the W8A16 crossover between the two portable kernels of ``weight_quant_matmul``.

fast:   ``torch._weight_int8pack_mm(x, w_nk, scale)`` (int8 weight read directly, fp32
        accumulation, one rounding) -- symmetric per-tensor/per-channel, bf16 only (the fp16
        and fp32 variants of the kernel are 10-25x slower on AVX2);
golden: ``antiquant_weight`` (int8 -> bf16 ``w * s``, rounded as the vendor golden) then
        either one bf16 GEMM ("bf16") or an fp32 GEMM on the upcast operands ("f32"); both
        round once. On CPUs without native bf16 (AVX2) oneDNN's bf16 GEMM is slow at large m,
        so this also measures ``ascend_ops._portable.BF16_GEMM_MAX_M`` (fp_matmul's switch).

Both use the prepared weight layout (``prepare_w8a16_weight``: a (k, n) view of an (n, k)
contiguous tensor), as the layers store it. Prints the median time (ms) of ``--repeats`` runs per m
and the switch points, per shape (k x n)::

    .venv/bin/python bench/kernels_switch.py [--shapes 4096x4096,11008x4096] [--repeats 5]

The result is recorded in ``ascend_ops._portable.W8A16_INT8PACK_MAX_M``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ascend_ops.kernels import antiquant_weight, prepare_w8a16_weight


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocations, oneDNN primitive creation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_shape(k: int, n: int, ms: list[int], repeats: int, dtype: torch.dtype) -> int | None:
    """Print one table row per m (median ms); return the first m where int8pack loses."""
    g = torch.Generator().manual_seed(0)
    w = prepare_w8a16_weight(torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8))
    scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(dtype)
    w_nk = w.t()
    w_bf16 = antiquant_weight(w, scale, None, 0, dtype)
    crossover = mm_cross = None
    print(f"k={k} n={n} dtype={dtype} threads={torch.get_num_threads()}")
    print(
        f"{'m':>6} {'int8pack':>10} {'deq+bf16':>10} {'deq+f32':>10} {'bf16 mm':>10} {'f32 mm':>10}"
    )
    for m in ms:
        x = torch.randn(m, k, generator=g).to(dtype)

        def fast(x: torch.Tensor = x) -> torch.Tensor:
            return torch._weight_int8pack_mm(x, w_nk, scale)

        def golden_bf16(x: torch.Tensor = x) -> torch.Tensor:
            return torch.matmul(x, antiquant_weight(w, scale, None, 0, dtype))

        def golden_f32(x: torch.Tensor = x) -> torch.Tensor:
            wd = antiquant_weight(w, scale, None, 0, dtype)
            return torch.matmul(x.float(), wd.float()).to(dtype)

        def mm_bf16(x: torch.Tensor = x) -> torch.Tensor:
            return torch.matmul(x, w_bf16)

        def mm_f32(x: torch.Tensor = x) -> torch.Tensor:
            return torch.matmul(x.float(), w_bf16.float()).to(dtype)

        t = [_median_ms(f, repeats) for f in (fast, golden_bf16, golden_f32, mm_bf16, mm_f32)]
        if crossover is None and t[0] > min(t[1], t[2]):
            crossover = m
        if mm_cross is None and t[3] > t[4]:
            mm_cross = m
        print(f"{m:>6}" + "".join(f" {v:>10.2f}" for v in t), flush=True)
    print(
        f"-> k={k} n={n}: int8pack loses first at m={crossover}; "
        f"f32 upcast GEMM beats bf16 GEMM first at m={mm_cross}\n"
    )
    return crossover


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,1024x4096,11008x4096")
    ap.add_argument("--ms", default="1,4,16,32,64,128,256,384,512,1024")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    ms = [int(v) for v in args.ms.split(",")]
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        bench_shape(k, n, ms, args.repeats, dtype)


if __name__ == "__main__":
    main()
