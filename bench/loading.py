"""loading: sharded TP=2 ``tp_layers.load_weights`` of a >= 1 GiB bf16 safetensors checkpoint vs
``torch.load(weights_only=True)`` of the same weights and vs ``safetensors.torch.load_file`` of
the full file.

The checkpoint (generated once in a temp dir) is a stack of Llama-7B-shaped MLPs (hidden 4096,
intermediate 11008: gate / up ColumnParallel, down RowParallel). Every measurement runs in
fresh spawned processes and reports wall time and the peak RSS (``resource.getrusage
(RUSAGE_SELF).ru_maxrss`` inside the child), both absolute and above the child's RSS right
before loading (torch imported, model built on the meta device): the part loading costs.
``load_file`` returns tensors backed by a private mmap of the file (no copy; pages are read on
first use), so its time and RSS are those of mapping, not reading; listed for reference.
Targets: peak RSS increase per rank <= 0.6x the checkpoint; ours >= 5x faster than torch.load.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Ratio,
    Target,
    plot_bars,
    print_table,
    print_targets,
    run_ranks,
    save_results,
)

HIDDEN, INTER = 4096, 11008


def _rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM (the high-water mark of its own address space).

    ru_maxrss is not used as is: Linux carries it across fork + exec, so a spawned child starts
    with its parent's peak (here: the parent that generated the checkpoint). It is still read,
    and the smaller of the two reported, which is VmHWM whenever the parent was larger."""
    hwm = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return ru if hwm is None else min(hwm, ru)


def build_model(layers: int, tp: Any, device: str = "meta") -> Any:
    """ModuleList of MLP blocks (gate/up ColumnParallel, down RowParallel), bf16, on ``device``."""
    import torch
    from torch import nn

    import tp_layers

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            kw = {"bias": False, "tp": tp, "params_dtype": torch.bfloat16, "device": device}
            self.gate_proj = tp_layers.ColumnParallelLinear(HIDDEN, INTER, **kw)
            self.up_proj = tp_layers.ColumnParallelLinear(HIDDEN, INTER, **kw)
            self.down_proj = tp_layers.RowParallelLinear(INTER, HIDDEN, **kw)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = MLP()

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(layers))

    return Stack()


def write_checkpoint(root: Path, layers: int) -> tuple[Path, Path, int]:
    """(safetensors dir, torch.save file, bytes) of a random bf16 checkpoint."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name, shape in (
            ("gate_proj", (INTER, HIDDEN)),
            ("up_proj", (INTER, HIDDEN)),
            ("down_proj", (HIDDEN, INTER)),
        ):
            sd[f"layers.{i}.mlp.{name}.weight"] = (
                torch.randn(shape, generator=g).mul_(0.02).bfloat16()
            )
    st_dir = root / "st"
    st_dir.mkdir()
    save_file(sd, str(st_dir / "model.safetensors"))
    pt = root / "model.pt"
    torch.save(sd, str(pt))
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    return st_dir, pt, nbytes


def ours_rank(rank: int, ws: int, st_dir: str, layers: int) -> dict:
    """One rank of the sharded load (gloo group already up)."""
    import torch.distributed as dist

    import tp_layers

    tp = tp_layers.get_tp()
    model = build_model(layers, tp)
    before = _rss_mb()
    dist.barrier()
    t0 = time.perf_counter()
    report = tp_layers.load_weights(model, st_dir)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "rss_before_mb": before,
        "peak_rss_mb": _rss_mb(),
        "bytes_read": report.bytes_read,
    }


def _single(kind: str, path: str, q: Any) -> None:
    import torch

    before = _rss_mb()
    t0 = time.perf_counter()
    if kind == "torch_load":
        sd = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        sd = load_file(str(Path(path) / "model.safetensors"))
    wall = time.perf_counter() - t0
    q.put({"wall_s": wall, "rss_before_mb": before, "peak_rss_mb": _rss_mb(), "n": len(sd)})


def single_process(kind: str, path: str) -> dict:
    """Run one full load in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_single, args=(kind, path, q))
    p.start()
    out = q.get(timeout=900)
    p.join()
    return out


def run(quick: bool = False) -> list[Target]:
    """Measure, print, write bench/results/loading.{json,png}."""
    layers = 4  # 4 x 3 x 11008 x 4096 x 2 B = 1.01 GiB
    repeats = 2 if quick else 3
    samples: dict[str, list[dict]] = {"ours_tp2": [], "torch_load": [], "load_file": []}
    with tempfile.TemporaryDirectory(prefix="bench_loading_") as tmp:
        st_dir, pt, nbytes = write_checkpoint(Path(tmp), layers)
        for _ in range(repeats):  # interleaved, each in fresh processes
            ranks = run_ranks("bench.loading:ours_rank", 2, str(st_dir), layers, threads=1)
            samples["ours_tp2"].append(
                {
                    "wall_s": max(r["wall_s"] for r in ranks),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
                    "rss_before_mb": max(r["rss_before_mb"] for r in ranks),
                    "ranks": ranks,
                }
            )
            samples["torch_load"].append(single_process("torch_load", str(pt)))
            samples["load_file"].append(single_process("load_file", str(st_dir)))
    gib = nbytes / 2**30
    ck_mb = nbytes / 2**20

    def med(kind: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[kind])

    def inc(s: dict) -> float:
        return s["peak_rss_mb"] - s["rss_before_mb"]

    speed = [t["wall_s"] / o["wall_s"] for t, o in zip(samples["torch_load"], samples["ours_tp2"])]
    rss_ratio = [inc(s) / ck_mb for s in samples["ours_tp2"]]
    table = []
    for kind in samples:
        incs = [inc(s) for s in samples[kind]]
        table.append(
            (
                kind,
                f"{med(kind, 'wall_s'):.2f}",
                f"{min(s['wall_s'] for s in samples[kind]):.2f}-{max(s['wall_s'] for s in samples[kind]):.2f}",
                f"{med(kind, 'peak_rss_mb'):.0f}",
                f"{statistics.median(incs):.0f}",
                f"{statistics.median(incs) / ck_mb:.2f}",
            )
        )
    print_table(
        f"loading: {gib:.2f} GiB bf16 checkpoint ({layers} Llama-7B MLPs), fresh processes, "
        f"median of {repeats}",
        ("loader", "wall s", "min-max", "peak RSS MB", "RSS added MB", "added / ckpt"),
        table,
    )
    targets = [
        Target(
            "loading: peak RSS added per rank (TP=2) / checkpoint",
            Ratio(statistics.median(rss_ratio), min(rss_ratio), max(rss_ratio)),
            "<=",
            0.6,
            note=f"absolute peak incl. torch: {med('ours_tp2', 'peak_rss_mb'):.0f} MB "
            f"= {med('ours_tp2', 'peak_rss_mb') / ck_mb:.2f}x",
        ),
        Target(
            "loading: speedup of TP=2 load_weights over torch.load(weights_only=True)",
            Ratio(statistics.median(speed), min(speed), max(speed)),
            ">=",
            5.0,
        ),
    ]
    print_targets(targets)
    kinds = list(samples)
    plot_bars(
        "loading",
        f"loading a {gib:.2f} GiB checkpoint: wall time (s) and RSS added (GiB)",
        kinds,
        {
            "wall s": [med(k, "wall_s") for k in kinds],
            "RSS added GiB (per rank)": [
                statistics.median(inc(s) for s in samples[k]) / 1024 for k in kinds
            ],
        },
        "s / GiB",
    )
    save_results(
        "loading",
        {"quick": quick, "checkpoint_bytes": nbytes, "layers": layers, "samples": samples},
        targets,
    )
    return targets
