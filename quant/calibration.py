"""Calibration data for static W8A8: collecting layer inputs and the calib file format.

Calib file (``--calib FILE``): one safetensors file (no pickle), any mix of, per module
``M`` (the linear layer's name, i.e. its weight name without ``.weight``):

- ``"M"``: float tensor (..., k) of sample inputs of that layer (rows are tokens). Gives the
  observers (min-max or percentile) their data, and the report its output error.
- ``"M.input_min"`` and ``"M.input_max"``: one-element float tensors, an already observed
  range (min-max only; no output error in the report).

or, alternatively, token ids to run through the float model (needs ``config.json`` in the
model directory and ``transformers``):

- ``"input_ids"``: int tensor (batch, seq); optional ``"attention_mask"`` of the same shape
  (positions with mask 0 are padding and enter no statistic).

or text, tokenized with the model directory's tokenizer and run through the float model:

- a plain text file (any name not ending in ``.safetensors`` / ``.jsonl``): tokenized as one
  stream and cut into ``samples`` sequences of ``seq_len`` tokens;
- a JSONL file (``.jsonl``): one prompt per line, a JSON string or an object with a
  ``"text"``, ``"prompt"`` or ``"content"`` field; the first ``samples`` prompts, each
  truncated to ``seq_len`` tokens, padded in batches (padding excluded).

The float model is built with the class whose parameter names match the checkpoint's tensor
names (``AutoModelForCausalLM`` for ``model.layers...`` + ``lm_head``, ``AutoModel`` for a bare
base model), whatever ``config.json``'s ``architectures`` says (SmolLM2's is null), so the
recorded module names are the checkpoint's.

``save_activations`` writes the first format; ``collect_activations`` records the inputs of an
in-memory model's linear layers.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quant.algorithms import ActivationRange, MinMaxObserver, MSEObserver, PercentileObserver

__all__ = [
    "Calibration",
    "collect_activations",
    "load_calibration",
    "observe_ranges",
    "save_activations",
    "special_prefix",
]


@dataclass
class Calibration:
    """Loaded calib data: ``activations`` (module -> (rows, k) float32) and/or ``ranges``
    (module -> observed range, from ``.input_min`` / ``.input_max`` entries)."""

    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    ranges: dict[str, ActivationRange] = field(default_factory=dict)

    def modules(self) -> set[str]:
        return set(self.activations) | set(self.ranges)

    def range_of(
        self, module: str, observer: str = "minmax", percentile: float = 99.99
    ) -> ActivationRange:
        """Input range of ``module``: stored range, else observed on its activations."""
        if module in self.ranges:
            return self.ranges[module]
        if module not in self.activations:
            raise KeyError(f"calibration has no data for {module!r}")
        obs = make_observer(observer, percentile)
        obs.update(self.activations[module])
        return obs.range()


OBSERVERS = ("minmax", "percentile", "mse")


@contextlib.contextmanager
def quiet_progress(quiet: bool = True) -> Iterator[None]:
    """Silence transformers' progress bars (model loading) inside the block."""
    if not quiet:
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is optional
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def make_observer(
    kind: str, percentile: float = 99.99
) -> MinMaxObserver | PercentileObserver | MSEObserver:
    """``"minmax"``, ``"percentile"`` or ``"mse"`` (clipped range of least int8 error)."""
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile)
    if kind == "mse":
        return MSEObserver()
    raise ValueError(f"observer: expected one of {', '.join(OBSERVERS)}, got {kind!r}")


def collect_activations(
    model: nn.Module,
    run: Callable[[], Any],
    *,
    modules: Iterable[str] | None = None,
    max_rows: int = 4096,
    token_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Record the inputs of ``model``'s nn.Linear layers while ``run()`` executes.

    modules: fqns to record (default: every nn.Linear). Keeps at most ``max_rows`` rows per
    module (the first ones seen). token_mask: (batch, seq) bool of the real (not padding)
    tokens of the run; inputs of that leading shape keep only those rows. Returns fqn ->
    (rows, k) float32 tensors.
    """
    wanted = None if modules is None else set(modules)
    store: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(fqn: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            have = counts.get(fqn, 0)
            if have >= max_rows:
                return
            x = args[0].detach()
            if token_mask is not None and x.shape[:-1] == token_mask.shape:
                x = x[token_mask]
            x = x.reshape(-1, x.shape[-1])[: max_rows - have]
            store.setdefault(fqn, []).append(x.to(torch.float32).cpu())
            counts[fqn] = have + x.shape[0]

        return hook

    for fqn, m in model.named_modules():
        if isinstance(m, nn.Linear) and (wanted is None or fqn in wanted):
            hooks.append(m.register_forward_pre_hook(make_hook(fqn)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def observe_ranges(
    activations: Mapping[str, torch.Tensor], observer: str = "minmax", percentile: float = 99.99
) -> dict[str, ActivationRange]:
    """module -> input range of its recorded activations."""
    out = {}
    for name, x in activations.items():
        obs = make_observer(observer, percentile)
        obs.update(x)
        out[name] = obs.range()
    return out


def save_activations(path: str | os.PathLike[str], activations: Mapping[str, torch.Tensor]) -> None:
    """Write a calib file (format 1: module -> activations)."""
    save_file(
        {k: v.detach().to(torch.float32).contiguous() for k, v in activations.items()},
        str(path),
        metadata={"format": "quant-calib-activations"},
    )


def load_calibration(
    path: str | os.PathLike[str],
    *,
    model_dir: str | os.PathLike[str] | None = None,
    max_rows: int = 4096,
    samples: int = 64,
    seq_len: int = 512,
) -> Calibration:
    """Read a calib file (see the module docstring). A token-id or text file is run through
    the float model in ``model_dir`` (text: ``samples`` sequences of at most ``seq_len``
    tokens). Raises FileNotFoundError / ValueError with the reason."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calib file not found: {p}")
    if samples < 1 or seq_len < 2:
        raise ValueError(f"calib: samples must be >= 1 and seq_len >= 2, got {samples}, {seq_len}")
    if not p.name.endswith(".safetensors"):
        ids, mask = _tokenize_file(p, model_dir, samples, seq_len)
        return _run_model(ids, mask, model_dir, max_rows)
    try:
        with safe_open(str(p), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"calib file {p} is not a readable safetensors file: {e}") from e
    if "input_ids" in tensors:
        ids, mask = tensors["input_ids"], tensors.get("attention_mask")
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
            raise ValueError(f"calib file {p}: input_ids must be an int tensor (batch, seq)")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"calib file {p}: attention_mask shape differs from input_ids'")
        return _run_model(ids.long(), mask, model_dir, max_rows)
    cal = Calibration()
    for k, v in tensors.items():
        if k.endswith(".input_min") or k.endswith(".input_max"):
            continue
        if not v.is_floating_point() or v.dim() < 1:
            raise ValueError(f"calib file {p}: {k!r} must be a float tensor (..., k)")
        cal.activations[k] = v.reshape(-1, v.shape[-1]).to(torch.float32)
    for k in tensors:
        if k.endswith(".input_min"):
            mod = k[: -len(".input_min")]
            hi = tensors.get(f"{mod}.input_max")
            if hi is None:
                raise ValueError(f"calib file {p}: {k!r} without {mod}.input_max")
            cal.ranges[mod] = ActivationRange(
                float(tensors[k].reshape(-1)[0]), float(hi.reshape(-1)[0])
            )
        elif k.endswith(".input_max") and f"{k[: -len('.input_max')]}.input_min" not in tensors:
            raise ValueError(f"calib file {p}: {k!r} without its .input_min")
    if not cal.modules():
        raise ValueError(f"calib file {p} holds no activations or ranges")
    return cal


def _tokenizer(model_dir: str | os.PathLike[str] | None) -> Any:
    if model_dir is None:
        raise ValueError("a text calib file needs the model directory (its tokenizer)")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"calib: cannot load the tokenizer of {model_dir}: {e}") from e


def _prompts(p: Path) -> list[str]:
    """The prompts of a JSONL calib file."""
    out: list[str] = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"calib file {p}, line {i}: not JSON ({e})") from e
        if isinstance(row, dict):
            row = next((row[k] for k in ("text", "prompt", "content") if k in row), None)
        if not isinstance(row, str) or not row:
            raise ValueError(
                f"calib file {p}, line {i}: expected a string or an object with a "
                "'text' / 'prompt' / 'content' string"
            )
        out.append(row)
    if not out:
        raise ValueError(f"calib file {p} holds no prompts")
    return out


def special_prefix(tokenizer: Any) -> list[int]:
    """The token ids ``tokenizer`` puts before any text (``add_special_tokens=True`` on an empty
    string): ``[bos]`` for Gemma / Llama-style tokenizers, ``[]`` for SmolLM2 / GPT-2 style."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [int(i) for i in torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()]


def _tokenize_file(
    p: Path, model_dir: str | os.PathLike[str] | None, samples: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (batch, seq) of a text or JSONL calib file."""
    tok = _tokenizer(model_dir)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"calib file {p}: not UTF-8 text nor safetensors ({e})") from e
    if p.name.endswith(".jsonl"):
        rows = [
            tok(t, add_special_tokens=True)["input_ids"][:seq_len] for t in _prompts(p)[:samples]
        ]
    else:  # each sequence starts as a tokenized document does (Gemma: <bos>)
        stream = tok(text, add_special_tokens=False)["input_ids"]
        pre = special_prefix(tok)[: seq_len - 2]
        n = seq_len - len(pre)
        rows = [pre + stream[i : i + n] for i in range(0, len(stream), n)][:samples]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError(f"calib file {p}: no text to calibrate on")
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _model_class(model_dir: Path, transformers: Any, cfg: Any) -> Any:
    """The transformers auto class whose parameter names match the checkpoint's tensors."""
    from quant.checkpoint import CheckpointReader

    with CheckpointReader(model_dir) as reader:
        names = set(reader.names())
    best, best_hits = transformers.AutoModelForCausalLM, -1
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        with torch.device("meta"):
            try:
                keys = set(cls.from_config(cfg).state_dict())
            except (ValueError, KeyError):
                continue
        hits = len(keys & names)
        if hits > best_hits:
            best, best_hits = cls, hits
    return best


def _run_model(
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    model_dir: str | os.PathLike[str] | None,
    max_rows: int,
    batch: int = 8,
) -> Calibration:
    """Record every nn.Linear's inputs (padding excluded) of the float model in model_dir."""
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        raise ValueError("a token-id or text calib file needs a model directory with config.json")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is an optional dependency
        raise ValueError("calib: token ids / text need the 'transformers' package") from e
    cfg = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    cls = _model_class(Path(model_dir), transformers, cfg)
    model = cls.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    model.eval()
    mask = torch.ones_like(ids) if mask is None else mask.long()
    parts: list[dict[str, torch.Tensor]] = []
    for i in range(0, ids.shape[0], batch):
        b_ids, b_mask = ids[i : i + batch], mask[i : i + batch]
        parts.append(
            collect_activations(
                model,
                lambda b_ids=b_ids, b_mask=b_mask: model(input_ids=b_ids, attention_mask=b_mask),
                max_rows=max_rows,
                token_mask=b_mask.bool(),
            )
        )
    acts = {k: torch.cat([p[k] for p in parts if k in p])[:max_rows] for k in parts[0]}
    return Calibration(activations=acts)
