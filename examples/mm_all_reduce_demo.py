"""The vendor doc's single-op example on CPU ranks (gloo), checked against the unsharded matmul.

    python examples/mm_all_reduce_demo.py [--world-size 2] [--dtype bf16]

Each rank holds a k-slice of x1 [128, 512] and x2 [512, 64]; ``mm_all_reduce_base`` multiplies
and sums over the ranks, so every rank must print the unsharded ``x1 @ x2``.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run(
    rank: int,
    world_size: int,
    port: int,
    x1_shape: list[int],
    x2_shape: list[int],
    dtype: str,
    brief: bool = False,
) -> None:
    import ascend_ops

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    torch.set_num_threads(1)
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)  # identical full tensors on every rank
    x1 = torch.randn(x1_shape, generator=g).to(dt)
    x2 = torch.randn(x2_shape, generator=g).to(dt)
    k = x1_shape[-1] // world_size
    ks = slice(rank * k, (rank + 1) * k)
    hcom = ascend_ops.hcom_name()
    with torch.no_grad():
        out = ascend_ops.mm_all_reduce_base(
            x1[:, ks].contiguous(), x2[ks].contiguous(), hcom, reduce_op="sum"
        )
    ref = x1.double() @ x2.double()
    err = (out.double() - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    for r in range(world_size):
        if r == rank:
            shown = [round(v, 4) for v in out[0, :6].tolist()] if brief else f"\n{out}"
            print(
                f"[rank {rank}] hcom={hcom!r} output {tuple(out.shape)} {out.dtype}: {shown}",
                flush=True,
            )
            print(
                f"[rank {rank}] max |output - unsharded x1 @ x2| = {err:.4g} (relative {rel:.2e})",
                flush=True,
            )
        dist.barrier()
    outs = [torch.empty_like(out) for _ in range(world_size)]
    dist.all_gather(outs, out)
    same = all(torch.equal(o, out) for o in outs)
    if rank == 0:
        ok = same and rel < 2e-2
        print(f"unsharded x1 @ x2 (float64) row 0: {[round(v, 4) for v in ref[0, :6].tolist()]}")
        print(f"every rank got the same output: {same}; matches the unsharded matmul: {rel < 2e-2}")
        print("DEMO OK" if ok else "DEMO FAILED", flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--world-size", type=int, default=2, choices=[1, 2, 4, 8])
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--brief", action="store_true", help="print only the first 6 values of row 0")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(
        run,
        args=(args.world_size, port, [128, 512], [512, 64], args.dtype, args.brief),
        nprocs=args.world_size,
    )


if __name__ == "__main__":
    main()
