"""generation: prefill / decode tokens/s of a Llama-architecture model, ours vs Hugging Face.

Model: a 4-layer, hidden-1024 random-weight Llama (bf16, 16 heads, intermediate 2816, vocab
32000), saved once with ``save_pretrained`` in a temp dir. Task: a 256-token prompt + 32 greedy
tokens (``generate``, batch 1). Rows:

- ``hf``: ``AutoModelForCausalLM.from_pretrained`` unsharded (2 threads) -- the baseline time;
- ``hf_tp2``: Hugging Face's own tensor parallelism, ``from_pretrained(..., tp_plan="auto")``
  under ``torchrun --nproc-per-node 2`` (CPU / gloo, 1 thread per rank) -- the peer to beat;
- ``ours``: ``tp_layers.load_pretrained(dir, tp, quant)`` at TP 1 (2 threads) and TP 2
  (torchrun, 1 thread per rank) for FP, W8A16, W8A8 dynamic and W8A8 static (static ranges:
  a fixed [-16, 16] for every layer; speed only).

Every row runs in fresh processes: load, one warm-up generate, then ``repeats`` timed ones
(median and min..max). Prefill time = prompt in -> first token out; decode = the other 31.
Targets: ours FP at TP 2 >= 1.5x faster than HF TP 2 (total generate time), and <= 1.15x the
unsharded HF time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Ratio,
    Target,
    _free_port,
    plot_bars,
    print_table,
    print_targets,
    save_results,
)

PROMPT, NEW = 256, 32
CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def make_model(path: Path) -> None:
    """Save the random-weight bf16 Llama to ``path`` (seeded)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**CONFIG)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(path))


class _Timer:
    """generate streamer: the time of the prompt and of every new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


class _AnyRange(dict):
    """Static W8A8 calibration answering one fixed range for every layer (speed runs only)."""

    def get(self, key: Any, default: Any = None) -> Any:
        from quant.algorithms import ActivationRange

        return ActivationRange(-16.0, 16.0)


def _scheme(name: str) -> Any:
    from quant.schemes import FP, W8A8, W8A16

    return {
        "fp": FP(),
        "w8a16": W8A16(),
        "w8a8_dynamic": W8A8(dynamic=True),
        "w8a8_static": W8A8(),
    }[name]


def worker(kind: str, model_dir: str, scheme: str, out: str, repeats: int) -> None:
    """One row, in this process (torchrun sets WORLD_SIZE / RANK for TP 2)."""
    import torch
    import transformers

    ws = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1 if ws > 1 else 2)
    t0 = time.perf_counter()
    if kind == "hf":
        kw: dict[str, Any] = {"dtype": torch.bfloat16}
        if ws > 1:
            kw["tp_plan"] = "auto"
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    else:
        import tp_layers

        tp = tp_layers.init_tp(backend="gloo") if ws > 1 else tp_layers.TPContext.single()
        model = tp_layers.load_pretrained(
            model_dir,
            tp,
            quant=_scheme(scheme),
            dtype=torch.bfloat16,
            calibration=_AnyRange() if scheme == "w8a8_static" else None,
        )
    load_s = time.perf_counter() - t0
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, CONFIG["vocab_size"], (1, PROMPT), generator=g)
    gen = {
        "max_new_tokens": NEW,
        "min_new_tokens": NEW,
        "do_sample": False,
        "pad_token_id": 0,
    }
    samples = []
    tokens: list[int] = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            timer = _Timer()
            if ws > 1:
                torch.distributed.barrier()
            start = time.perf_counter()
            y = model.generate(ids, streamer=timer, **gen)
            total = time.perf_counter() - start
            if i == 0:  # warm-up
                tokens = y[0, PROMPT:].tolist()
                continue
            prefill = timer.times[1] - timer.times[0]
            decode = timer.times[-2] - timer.times[1]
            samples.append({"total_s": total, "prefill_s": prefill, "decode_s": decode})
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "kind": kind,
                    "scheme": scheme,
                    "tp": ws,
                    "load_s": load_s,
                    "samples": samples,
                    "tokens": tokens,
                }
            )
        )


def _launch(kind: str, scheme: str, tp: int, model_dir: Path, repeats: int, tmp: Path) -> dict:
    out = tmp / f"{kind}_{scheme}_tp{tp}.json"
    args = [
        "-m",
        "bench.generation",
        "--worker",
        kind,
        "--model",
        str(model_dir),
        "--scheme",
        scheme,
        "--out",
        str(out),
        "--repeats",
        str(repeats),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TP_TIMEOUT", "600")
    if tp == 1:
        cmd = [sys.executable, *args]
        env["OMP_NUM_THREADS"] = "2"
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run"]
        cmd = [*torchrun, f"--nproc-per-node={tp}", f"--master-port={_free_port()}", *args]
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def rows_for(quick: bool) -> list[tuple[str, str, int]]:
    """(kind, scheme, tp) rows, the three rows the targets compare first."""
    rows = [("hf", "fp", 1), ("hf", "fp", 2), ("ours", "fp", 2), ("ours", "fp", 1)]
    schemes = ("w8a16", "w8a8_dynamic") if quick else ("w8a16", "w8a8_dynamic", "w8a8_static")
    for s in schemes:
        rows += [("ours", s, 1), ("ours", s, 2)]
    return rows


def _ratio(a: list[float], b: list[float]) -> Ratio:
    """median(a) / median(b) with the extreme ratios as spread (different processes)."""
    return Ratio(statistics.median(a) / statistics.median(b), min(a) / max(b), max(a) / min(b))


def run(quick: bool = False) -> list[Target]:
    """Measure, print, write bench/results/generation.{json,png}."""
    repeats = 2 if quick else 3
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_generation_") as tmp_s:
        tmp = Path(tmp_s)
        model_dir = tmp / "llama"
        make_model(model_dir)
        for kind, scheme, tp in rows_for(quick):
            r = _launch(kind, scheme, tp, model_dir, repeats, tmp)
            results.append(r)
            t = statistics.median(s["total_s"] for s in r["samples"])
            print(f"  {kind} {scheme} tp{tp}: {t:.2f} s", flush=True)
    ref_tokens = results[0]["tokens"]
    table = []
    for r in results:
        s = r["samples"]
        pre = statistics.median(x["prefill_s"] for x in s)
        dec = statistics.median(x["decode_s"] for x in s)
        tot = [x["total_s"] for x in s]
        same = sum(a == b for a, b in zip(r["tokens"], ref_tokens))
        table.append(
            (
                r["kind"],
                r["scheme"],
                r["tp"],
                f"{statistics.median(tot):.2f}",
                f"{min(tot):.2f}-{max(tot):.2f}",
                f"{PROMPT / pre:.0f}",
                f"{(NEW - 1) / dec:.1f}",
                f"{same}/{NEW}",
                f"{r['load_s']:.1f}",
            )
        )
    print_table(
        f"generation: {PROMPT}-token prefill + {NEW} greedy tokens, 4-layer hidden-1024 Llama "
        f"bf16 (random weights), median of {repeats}",
        (
            "impl",
            "scheme",
            "TP",
            "total s",
            "min-max",
            "prefill tok/s",
            "decode tok/s",
            "= HF tokens",
            "load s",
        ),
        table,
    )

    def tot(kind: str, scheme: str, tp: int) -> list[float]:
        r = next(x for x in results if (x["kind"], x["scheme"], x["tp"]) == (kind, scheme, tp))
        return [x["total_s"] for x in r["samples"]]

    targets = [
        Target(
            "generation: HF TP=2 time / ours TP=2 (FP)",
            _ratio(tot("hf", "fp", 2), tot("ours", "fp", 2)),
            ">=",
            1.5,
        ),
        Target(
            "generation: ours TP=2 (FP) time / unsharded HF",
            _ratio(tot("ours", "fp", 2), tot("hf", "fp", 1)),
            "<=",
            1.15,
        ),
    ]
    print_targets(targets)
    labels = [f"{r['kind']} {r['scheme']} tp{r['tp']}" for r in results]
    plot_bars(
        "generation",
        f"tokens/s ({PROMPT}-token prefill /10, {NEW}-token greedy decode)",
        labels,
        {
            "prefill tok/s / 10": [
                PROMPT / statistics.median(x["prefill_s"] for x in r["samples"]) / 10
                for r in results
            ],
            "decode tok/s": [
                (NEW - 1) / statistics.median(x["decode_s"] for x in r["samples"]) for r in results
            ],
        },
        "tokens / s",
    )
    save_results(
        "generation",
        {"quick": quick, "config": CONFIG, "prompt": PROMPT, "new_tokens": NEW, "results": results},
        targets,
    )
    return targets


def main() -> None:
    """Worker entry point (launched by run())."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True, choices=["hf", "ours"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--scheme", default="fp")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    worker(a.worker, a.model, a.scheme, a.out, a.repeats)


if __name__ == "__main__":
    main()
