"""quant: perplexity cost of each quantization recipe on a real model (``python -m bench quant``).

Model: the demo model (SmolLM2-135M-Instruct, ``examples/make_demo_model.py`` ->
.cache/demo-model; env ``BENCH_QUANT_MODEL`` for another directory). Eval text: the GPL-3
license text shipped with the OS (/usr/share/common-licenses/GPL-3, ~7.6k tokens; env
``BENCH_QUANT_EVAL``); calibration on a different text (GFDL-1.3, env ``BENCH_QUANT_CALIB``):
``BENCH_QUANT_CALIB_SAMPLES`` (default 8) sequences of 512 tokens, at most 2048 activation rows
kept per layer for GPTQ / smoothing / reports (ranges are observed on all of them).
Perplexity by ``quant.evaluate_perplexity`` (512-token non-overlapping windows, the first
``BENCH_QUANT_WINDOWS`` of them, default all: 15 windows, 7,643 scored tokens of GPL-3;
``--quick``: 2; each window preceded by the tokenizer's special prefix, e.g. Gemma's <bos>,
context only) in bf16 at TP 1; W8A8 dynamic also
through ``tp_layers.load_pretrained`` at TP 2 (each rank quantizes its half of a row-parallel
input with its own per-token scale, as the fused kernel does). Calibration is collected once
and shared by every recipe. The fallback curve keeps the N linears of largest output error in
the recommended static run's report FLOAT (what ``--fallback auto:N`` picks with a trial
conversion of the same settings). Targets (issue 15): W8A16 per-channel <= +0.3%, W8A16 group
<= +0.15%, W8A8 dynamic <= +2%, W8A8 static <= +3% with at most 10% of the linears in float.
``BENCH_QUANT_ONLY``: ``;``-separated label prefixes to run (``LABEL$``: that label only;
float always runs);
``BENCH_QUANT_FALLBACK``: the fallback curve's points in % of the linears (default 2,4,8,10);
``BENCH_QUANT_FALLBACK_BASE``: the recipe whose report ranks the fallback curve's layers
(default ``W8A8 static, smooth auto + GPTQ``);
``BENCH_QUANT_ALPHAS``: the fixed smoothing alphas of the static alpha curve (default
0.5,0.8,1.0; min-max ranges, no GPTQ: what ``--smooth ALPHA --recipe plain`` gives);
``BENCH_QUANT_W8A16_FALLBACK``: points (in % of the linears) of W8A16 per-channel with
``fallback=N`` (``--fallback auto:N``: ranked by a trial conversion's calibration output
error; default 5,10);
``BENCH_QUANT_TP2=0``: no TP 2 rows;
``BENCH_QUANT_RESULT``: results file name (default ``quant`` -> bench/results/quant.json), so
that parts of the table can run in parallel processes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, Target, print_table, run_ranks, save_results

WINDOW = 512


def _paths() -> tuple[Path, Path, Path]:
    model = Path(os.environ.get("BENCH_QUANT_MODEL", ROOT / ".cache" / "demo-model"))
    if not (model / "config.json").is_file():
        raise FileNotFoundError(
            f"{model}: no model (run examples/make_demo_model.py or set BENCH_QUANT_MODEL)"
        )
    text = Path(os.environ.get("BENCH_QUANT_EVAL", "/usr/share/common-licenses/GPL-3"))
    calib = Path(os.environ.get("BENCH_QUANT_CALIB", "/usr/share/common-licenses/GFDL-1.3"))
    return model, text, calib


def _recipes() -> list[tuple[str, str, dict[str, Any], bool]]:
    """(label, target group, quantize_checkpoint kwargs incl. the scheme, also at TP 2)."""
    from quant import W8A8, W8A16

    st, dyn = W8A8(), W8A8(dynamic=True)
    sg = SMOOTH_GPTQ
    return [  # cheap and decisive first: on a loaded machine the run may be cut short
        ("W8A16 per-channel min-max", "w8a16", {"config": W8A16()}, False),
        ("W8A16 group 64 min-max", "w8a16g", {"config": W8A16(group_size=64)}, False),
        ("W8A8 dynamic", "dyn", {"config": dyn}, True),
        ("W8A8 static min-max", "static", {"config": st}, False),
        ("W8A8 static, smooth auto + GPTQ", "static", {"config": st, **sg}, False),
        ("W8A8 static, smooth auto", "static", {"config": st, "smooth": "auto"}, False),
        (
            "W8A8 static, smooth 0.8 + GPTQ",
            "static",
            {"config": st, "smooth": 0.8, "gptq": True},
            False,
        ),
        ("W8A8 dynamic, smooth auto", "dyn", {"config": dyn, "smooth": "auto"}, True),
        ("W8A8 dynamic, smooth auto + GPTQ", "dyn", {"config": dyn, **sg}, True),
        (
            "W8A8 static, smooth auto + GPTQ, mse ranges",
            "static",
            {"config": st, **sg, "observer": "mse"},
            False,
        ),
        (
            "W8A8 static, smooth auto + GPTQ, percentile ranges",
            "static",
            {"config": st, **sg, "observer": "percentile"},
            False,
        ),
        ("W8A16 per-channel, GPTQ", "w8a16", {"config": W8A16(), "gptq": True}, False),
        ("W8A16 group 64, GPTQ", "w8a16g", {"config": W8A16(group_size=64), "gptq": True}, False),
    ]


SMOOTH_GPTQ: dict[str, Any] = {"smooth": "auto", "gptq": True}


def _is_cli_default(kw: dict[str, Any]) -> bool:
    """Whether a recipe's settings are what ``python -m quant --scheme S --calib FILE`` does."""
    from quant.recipes import recommended

    return {k: v for k, v in kw.items() if k != "config"} == recommended(kw["config"])


def _tp_ppl(
    rank: int, ws: int, qdir: str, ids: torch.Tensor, windows: int | None, prefix: list[int]
) -> float:
    from quant.evaluate import evaluate_perplexity
    from tp_layers import load_pretrained

    model = load_pretrained(qdir, dtype=torch.bfloat16, pad_heads=True)  # 9 heads over TP 2
    return evaluate_perplexity(model, ids, window=WINDOW, max_windows=windows, prefix=prefix).ppl


def _wanted(label: str) -> bool:
    only = [s.strip() for s in os.environ.get("BENCH_QUANT_ONLY", "").split(";") if s.strip()]
    return not only or any(
        label == s[:-1] if s.endswith("$") else label.startswith(s) for s in only
    )


def run(quick: bool = False) -> list[Target]:
    import transformers

    from quant import W8A8, W8A16, quantize_checkpoint
    from quant.calibration import load_calibration, special_prefix
    from quant.checkpoint import CheckpointReader
    from quant.evaluate import evaluate_perplexity, load_text

    model, text_path, calib_path = _paths()
    windows = 2 if quick else int(os.environ.get("BENCH_QUANT_WINDOWS", "0")) or None
    samples = int(os.environ.get("BENCH_QUANT_CALIB_SAMPLES", "8"))
    result_name = os.environ.get("BENCH_QUANT_RESULT", "quant")
    curve = [int(p) for p in os.environ.get("BENCH_QUANT_FALLBACK", "2,4,8,10").split(",") if p]
    fallback_base = os.environ.get("BENCH_QUANT_FALLBACK_BASE", "W8A8 static, smooth auto + GPTQ")
    w16_curve = [
        int(p) for p in os.environ.get("BENCH_QUANT_W8A16_FALLBACK", "5,10").split(",") if p
    ]
    alphas = [float(a) for a in os.environ.get("BENCH_QUANT_ALPHAS", "0.5,0.8,1.0").split(",") if a]
    tok = transformers.AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    ids = tok(load_text(text_path), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    prefix = special_prefix(tok)  # before every window, context only (Gemma: <bos>)
    t0 = time.perf_counter()
    cal = load_calibration(
        calib_path, model_dir=model, samples=samples, seq_len=WINDOW, max_rows=2048
    )
    print(f"calibration: {time.perf_counter() - t0:.0f} s", flush=True)
    with CheckpointReader(model) as r:
        n_linears = sum(1 for n in r.names() if n.endswith("proj.weight"))
    t0 = time.perf_counter()
    fp = evaluate_perplexity(model, ids, window=WINDOW, max_windows=windows, prefix=prefix)
    print(f"float: ppl {fp.ppl:.4f} {time.perf_counter() - t0:.0f} s", flush=True)
    setup = {
        "model": str(model.name),
        "eval_text": str(text_path),
        "calib_text": str(calib_path),
        "calib": f"{samples} x {WINDOW} tokens, <= 2048 activation rows per layer",
        "windows": fp.windows,
        "window": WINDOW,
        "n_linears": n_linears,
        "loader": "quant.evaluate.load_model, TP 1",
    }
    if prefix:
        setup["window_prefix"] = prefix
    payload: dict[str, Any] = {"setup": setup, "float_ppl": fp.ppl, "tokens": fp.tokens}
    payload["recipes"] = []
    rows: list[list[Any]] = [["float (bf16)", f"{fp.ppl:.4f}", "-", "0", ""]]

    tp2_on = os.environ.get("BENCH_QUANT_TP2", "1") != "0"

    def tp2_ppl(qdir: Path) -> tuple[float | None, str | None]:
        """(TP 2 perplexity through tp_layers, None) or (None, why the model does not load)."""
        try:
            return run_ranks("bench.quant:_tp_ppl", 2, str(qdir), ids, windows, prefix)[0], None
        except RuntimeError as e:
            return None, str(e).strip().splitlines()[-1]

    fp_tp2: float | None = None
    if tp2_on and any(tp2 and _wanted(label) for label, _, _, tp2 in _recipes()):
        # the same-loader baseline of the TP 2 rows (float through tp_layers at TP 2)
        fp_tp2, why = tp2_ppl(model)
        if fp_tp2 is None:
            print(f"float TP 2: skipped: {why}", flush=True)
        else:
            payload["float_tp2_ppl"] = fp_tp2
            rows.append(["float (bf16), tp_layers TP 2", f"{fp_tp2:.4f}", "-", "0", ""])
            pct2 = 100 * (fp_tp2 / fp.ppl - 1)
            print(f"float TP 2: ppl {fp_tp2:.4f} ({pct2:+.2f}%)", flush=True)

    def record(label: str, group: str, res: Any, out: Path, tp2: bool, kw: dict[str, Any]) -> None:
        t1 = time.perf_counter()
        q = evaluate_perplexity(out, ids, window=WINDOW, max_windows=windows, prefix=prefix)
        pct = 100 * (q.ppl / fp.ppl - 1)
        entry: dict[str, Any] = {
            "label": label,
            "group": group,
            "ppl": q.ppl,
            "pct": pct,
            "excluded": res.excluded,
            "alphas": res.alphas,
            "convert_s": res.seconds,
            "cli_default": _is_cli_default(kw),
        }
        extra = ""
        tp2v, why = tp2_ppl(out) if tp2 and tp2_on else (None, None)
        if why is not None:  # the model does not load at TP 2: say why, go on
            entry["tp2_error"] = why
            extra = f"TP 2 skipped: {why}"
        elif tp2v is not None:
            entry["tp2_ppl"], entry["tp2_pct"] = tp2v, 100 * (tp2v / fp.ppl - 1)
            extra = f"TP 2 {tp2v:.4f} ({entry['tp2_pct']:+.2f}%"
            if fp_tp2 is not None:
                entry["tp2_pct_vs_tp2_float"] = 100 * (tp2v / fp_tp2 - 1)
                extra += f"; {entry['tp2_pct_vs_tp2_float']:+.2f}% vs float TP 2"
            extra += ")"
        entry["eval_s"] = time.perf_counter() - t1
        shown = f"{label} (CLI default)" if entry["cli_default"] else label
        rows.append([shown, f"{q.ppl:.4f}", f"{pct:+.2f}%", str(len(res.excluded)), extra])
        print(
            f"{label}: ppl {q.ppl:.4f} ({pct:+.2f}%) convert {res.seconds:.0f} s, "
            f"eval {entry['eval_s']:.0f} s {extra}",
            flush=True,
        )
        payload["recipes"].append(entry)
        save_results(result_name, payload, _targets(_best(payload["recipes"], n_linears)))

    def measure(label: str, group: str, kw: dict[str, Any], tp2: bool = False) -> Any:
        """Convert with ``kw`` into the scratch directory and record the row (None: not
        wanted)."""
        if not _wanted(label):
            return None
        out = tmp / "out"
        shutil.rmtree(out, ignore_errors=True)
        report = label == fallback_base
        res = quantize_checkpoint(model, out, calib=cal, progress=False, report=report, **kw)
        record(label, group, res, out, tp2, kw)
        return res

    tmp = Path(tempfile.mkdtemp(prefix="bench-quant-", dir=ROOT / ".cache"))
    try:
        for label, group, kw, tp2 in _recipes():
            res = measure(label, group, kw, tp2)
            if res is None or label != fallback_base:
                continue
            ranked = sorted(
                (r for r in res.reports if r.out_rel_err is not None),
                key=lambda r: r.out_rel_err or 0.0,
                reverse=True,
            )
            payload["static_worst_layers"] = [[r.name, r.out_rel_err] for r in ranked[:30]]
            for pct_float in curve:  # the N linears of largest output error FLOAT, same settings
                n = n_linears * pct_float // 100  # at most pct_float% FLOAT
                worst = [r.name for r in ranked[:n]]
                measure(f"{label}, fallback {n} ({pct_float}%)", group, {**kw, "exclude": worst})
        for pct_float in w16_curve:
            n = n_linears * pct_float // 100  # at most pct_float% FLOAT
            kw = {"config": W8A16(), "fallback": n}
            measure(f"W8A16 per-channel, fallback {n} ({pct_float}%)", "w8a16", kw)
        for alpha in alphas:
            measure(f"W8A8 static, smooth {alpha:g}", "static", {"config": W8A8(), "smooth": alpha})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(
        f"perplexity, {fp.tokens} tokens of {text_path.name} ({fp.windows} x {WINDOW}-token windows), "
        f"calibration {samples} x {WINDOW} tokens of {calib_path.name}",
        ["recipe", "ppl", "vs float", "linears float", "TP"],
        rows,
    )
    targets = _targets(_best(payload["recipes"], n_linears))
    save_results(result_name, payload, targets)
    return targets


def _targets(best: dict[str, float]) -> list[Target]:
    goals = [
        ("w8a16", "W8A16 per-channel ppl cost", 0.3),
        ("w8a16g", "W8A16 group ppl cost", 0.15),
        ("dyn", "W8A8 dynamic ppl cost (TP 1)", 2.0),
        ("static", "W8A8 static ppl cost (<= 10% float)", 3.0),
    ]
    return [Target(name, best[g], "<=", goal, "%") for g, name, goal in goals if g in best]


def _best(recipes: list[dict[str, Any]], n_linears: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for r in recipes:
        if len(r["excluded"]) <= n_linears // 10:
            best[r["group"]] = min(best.get(r["group"], math.inf), r["pct"])
    return best


def merge(names: list[str]) -> dict[str, Any]:
    """Merge results files of parallel parts (``BENCH_QUANT_RESULT``) into bench/results/quant.json
    (or ``$BENCH_QUANT_RESULT.json``).
    The parts must share the setup up to the loader; each recipe keeps the float perplexity it
    is compared with (its part's, same loader) and its part's name. Returns the merged
    document."""
    import json

    from bench.common import RESULTS

    given = dict(n.partition("@")[::2] for n in names)  # NAME@LOADER: a file without "loader"
    names = list(given)
    docs = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]

    def same(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d["setup"].items() if k != "loader"}

    base = docs[0]
    recipes: dict[str, dict[str, Any]] = {}  # label -> row; a later part's row replaces
    floats: dict[str, float] = {}
    for n, d in zip(names, docs):
        if same(d) != same(base):
            raise ValueError(f"{n}: setup {d['setup']} differs from {base['setup']}")
        loader = d["setup"].get("loader") or given[n]
        if not loader:
            raise ValueError(f"{n}: the file does not say its loader: pass {n}@LOADER")
        floats[loader] = d["float_ppl"]
        for r in d["recipes"]:
            recipes[r["label"]] = {**r, "part": n, "loader": loader, "float_ppl": d["float_ppl"]}
    payload: dict[str, Any] = {"setup": same(base), "float_ppl_by_loader": floats}
    payload["recipes"] = list(recipes.values())
    payload["parts"] = [
        {"name": n, "date": d["date"], "host": d["host"]} for n, d in zip(names, docs)
    ]
    for d in docs:
        if "float_tp2_ppl" in d:
            payload["float_tp2_ppl"] = d["float_tp2_ppl"]
        if "static_worst_layers" in d:
            payload["static_worst_layers"] = d["static_worst_layers"]
    targets = _targets(_best(payload["recipes"], base["setup"]["n_linears"]))
    save_results(os.environ.get("BENCH_QUANT_RESULT", "quant"), payload, targets)
    return {**payload, "targets": [t.as_dict() for t in targets]}


def markdown(doc: dict[str, Any]) -> str:
    """The README table of a merged results document (a loader column when the parts used
    more than one)."""
    many = len(doc["float_ppl_by_loader"]) > 1
    head = ["recipe", *(["loader (float ppl)"] if many else []), "ppl", "vs float"]
    head += ["linears float", "TP 2 ppl (vs float TP 1; vs float TP 2)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(cells: list[str]) -> None:
        lines.append("| " + " | ".join(cells) + " |")

    for loader, ppl in doc["float_ppl_by_loader"].items():
        tp2 = f"{doc['float_tp2_ppl']:.4f}" if "float_tp2_ppl" in doc else ""
        row(["float (bf16)", *([loader] if many else []), f"{ppl:.4f}", "-", "0", tp2])
    defaults = {label for label, _, kw, _ in _recipes() if _is_cli_default(kw)}
    for r in doc["recipes"]:
        tp2 = ""
        if "tp2_ppl" in r:
            tp2 = f"{r['tp2_ppl']:.4f} ({r['tp2_pct']:+.2f}%"
            if "tp2_pct_vs_tp2_float" in r:
                tp2 += f"; {r['tp2_pct_vs_tp2_float']:+.2f}%"
            tp2 += ")"
        label = f"**{r['label']}** (CLI default)" if r["label"] in defaults else r["label"]
        loader = [f"{r['loader']} ({r['float_ppl']:.4f})"] if many else []
        row([label, *loader, f"{r['ppl']:.4f}", f"{r['pct']:+.2f}%", str(len(r["excluded"])), tp2])
    return "\n".join(lines)


def token_spread(layers: tuple[int, ...] = (1, 5, 15, 28), tokens: int = 512) -> list[list[str]]:
    """Per-token max|x| of a few linears' inputs on the calibration text (float model, fp32):
    the first token against the median and the largest of the others. Static W8A8 has one
    activation scale per tensor, so a token far above the median leaves the median token few
    of the 255 int8 levels; per-token (dynamic) scales and per-channel smoothing do not share
    that limit. Rows: [linear, token 0, median, max of the others, max / median]."""
    import transformers

    from quant.evaluate import load_text

    model_dir, _, calib = _paths()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tok(load_text(calib), return_tensors="pt", add_special_tokens=False)["input_ids"]
    rows: list[list[str]] = []

    def hook(name: str) -> Any:
        def pre(_mod: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            m = inp[0][0].abs().amax(-1)
            top = float(torch.maximum(m[0], m[1:].max()))
            med = float(m[1:].median())
            row = [name, f"{float(m[0]):.2f}", f"{med:.2f}", f"{float(m[1:].max()):.2f}"]
            rows.append([*row, f"{top / med:.1f}x"])

        return pre

    for i in layers:
        for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            mod = model.model.layers[i].get_submodule(n)
            mod.register_forward_pre_hook(hook(f"layers.{i}.{n}"))
    with torch.no_grad():
        model(ids[:, :tokens])
    return rows


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["spread"]:
        head = ["input of", "token 0", "median token", "max other token", "max / median"]
        print_table("per-token max|x|, first 512 calibration tokens", head, token_spread())
    elif sys.argv[1:2] == ["merge"] and len(sys.argv) >= 3:
        print(markdown(merge(sys.argv[2:])))
    else:
        sys.exit(
            "usage: python -m bench.quant merge NAME[@LOADER] ...  (bench/results/NAME.json)\n"
            "       python -m bench.quant spread"
        )
