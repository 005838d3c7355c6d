"""``quantize_checkpoint``: float safetensors model directory -> msmodelslim quantized directory.

Streams one tensor at a time (``safe_open`` per source shard), writes output shards
incrementally through ``CheckpointWriter`` (atomic; nothing is left behind on error), and
validates everything it can *before* writing: the scheme against every layer shape, the
calibration coverage for static W8A8, the output path.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quant.algorithms import dequantize_linear, quantize_linear
from quant.calibration import Calibration, load_calibration, make_observer
from quant.checkpoint import DESCRIPTION_FILE, INDEX_FILE, CheckpointReader, CheckpointWriter
from quant.convention import deq_scale_to_float32
from quant.modules import QuantLinear, is_skipped
from quant.schemes import W8A8, W8A16, Scheme
from quant.smooth import (
    DownSmoothGroup,
    SmoothGroup,
    apply_smoothing,
    find_down_smooth_groups,
    find_smooth_groups,
    group_act_absmax,
    scale_up_rows,
    search_alpha,
    smooth_scales,
)

__all__ = ["ConvertResult", "LayerReport", "format_report", "quantize_checkpoint"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


@dataclass
class LayerReport:
    """Quality of one quantized layer.

    weight_rel_err: ||W - W_hat||_F / ||W||_F. weight_max_err_half_scales: max over elements of
    |W - W_hat| / (scale / 2) (<= 1 up to float rounding). out_rel_err / out_max_abs_err: output
    of the quantized layer (ascend_ops kernels) vs the float layer on the calib activations,
    ||y_q - y||_F / ||y||_F and max |y_q - y| (None without activations).
    """

    name: str
    scheme: str
    n: int
    k: int
    weight_rel_err: float
    weight_max_err_half_scales: float
    out_rel_err: float | None = None
    out_max_abs_err: float | None = None


@dataclass
class ConvertResult:
    """What ``quantize_checkpoint`` did."""

    out_dir: Path
    scheme: str
    quantized: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    smoothed: list[str] = field(default_factory=list)  # norms whose output was smoothed
    smoothed_down: list[str] = field(default_factory=list)  # down_projs, inputs smoothed via up
    alphas: dict[str, float] = field(default_factory=dict)  # smoothed norm / down -> alpha
    shards: int = 0
    reports: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        smooth = ""
        if self.smoothed:
            down = f" and {len(self.smoothed_down)} o_proj/down_proj" if self.smoothed_down else ""
            smooth = f" (smoothed the inputs of {len(self.smoothed)} norms{down})"
        return (
            f"quantized {len(self.quantized)} layers to {self.scheme}{smooth}, kept "
            f"{len(self.kept_float)} tensors FLOAT, {self.shards} shard(s) -> {self.out_dir} "
            f"in {self.seconds:.1f}s"
        )


def _elementwise_scale(tensors: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    """(n, k) float32 weight scale of each element."""
    if "weight_scale" in tensors:
        s = tensors["weight_scale"].to(torch.float32).reshape(n, -1)
    else:  # static W8A8 without the optional weight_scale: deq_scale / input_scale
        deq = deq_scale_to_float32(tensors["deq_scale"])
        s = (deq / tensors["input_scale"].to(torch.float32).reshape(())).reshape(n, 1)
    return s.repeat_interleave(k // s.shape[1], dim=1)


def layer_report(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tensors: dict[str, torch.Tensor],
    scheme: Scheme,
    activations: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_rows: int = 512,
) -> LayerReport:
    """Weight and (with activations (rows, k)) output error of one quantized layer; the
    quantized layer runs on inputs cast to ``dtype`` (the model dtype)."""
    n, k = weight.shape
    w = weight.to(torch.float32)
    w_hat, _ = dequantize_linear(tensors, scheme)
    err = (w - w_hat).abs()
    rel = float(torch.linalg.norm(w - w_hat) / torch.linalg.norm(w).clamp_min(1e-30))
    half = _elementwise_scale(tensors, n, k) / 2
    rep = LayerReport(name, scheme.name, n, k, rel, float((err / half).max()))
    if activations is not None:
        x = activations[:max_rows].to(torch.float32)
        y = x @ w.t() + (0 if bias is None else bias.to(torch.float32))
        layer = QuantLinear(scheme, tensors)
        yq = layer(x.to(dtype)).to(torch.float32)
        rep.out_rel_err = float(torch.linalg.norm(yq - y) / torch.linalg.norm(y).clamp_min(1e-30))
        rep.out_max_abs_err = float((yq - y).abs().max())
    return rep


def format_report(reports: Sequence[LayerReport]) -> str:
    """Fixed-width table of per-layer errors plus a mean/max line."""
    if not reports:
        return "(no quantized layers)"
    width = max(len(r.name) for r in reports)
    head = (
        f"{'layer':<{width}}  {'scheme':<12} {'n x k':>11}  {'w rel err':>9}  "
        f"{'max|dw|/(s/2)':>13}  {'out rel err':>11}  {'out max abs':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        o1 = "-" if r.out_rel_err is None else f"{r.out_rel_err:.3e}"
        o2 = "-" if r.out_max_abs_err is None else f"{r.out_max_abs_err:.3e}"
        lines.append(
            f"{r.name:<{width}}  {r.scheme:<12} {f'{r.n}x{r.k}':>11}  "
            f"{r.weight_rel_err:9.3e}  {r.weight_max_err_half_scales:13.4f}  "
            f"{o1:>11}  {o2:>11}"
        )
    w = [r.weight_rel_err for r in reports]
    o = [r.out_rel_err for r in reports if r.out_rel_err is not None]
    line = f"mean weight rel err {sum(w) / len(w):.3e}, max {max(w):.3e}"
    if o:
        line += f"; mean output rel err {sum(o) / len(o):.3e}, max {max(o):.3e}"
    lines.append(line)
    return "\n".join(lines)


class _Progress:
    """tqdm when available and stderr is a TTY, else silent (the caller prints a summary)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        self._count = 0
        self._total = total
        self._plain = False
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="tensor", desc="quantize", file=sys.stderr)
            except ImportError:
                self._plain = True

    def update(self, name: str) -> None:
        self._count += 1
        if self._bar is not None:
            self._bar.set_postfix_str(name[-40:], refresh=False)
            self._bar.update(1)
        elif self._plain:
            print(f"\r[{self._count}/{self._total}] {name[-60:]:<60}", end="", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._plain:
            print(file=sys.stderr)


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    config: Scheme,
    *,
    calib: str | os.PathLike[str] | Calibration | None = None,
    calib_samples: int = 8,
    calib_seq_len: int = 512,
    skip: Iterable[str] = (),
    force: bool = False,
    report: bool = False,
    observer: str = "minmax",
    percentile: float = 99.99,
    act_symmetric: bool = False,
    model_dtype: torch.dtype | None = None,
    smooth: float | str | None = None,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Quantize the float safetensors model in ``src`` into an msmodelslim checkpoint ``dst``.

    Every 2-D floating ``*.weight`` whose module name matches no skip pattern (defaults: lm_head,
    embeddings, norms; ``skip`` adds ``re.search`` patterns) is quantized with ``config``;
    everything else is copied as ``FLOAT``. model_dtype: dtype of the float tensors and scales
    of the output (default: each tensor's source dtype). Static W8A8 needs ``calib`` (a calib
    file, see ``quant.calibration``: activations, token ids, plain text or JSONL prompts, of
    which ``calib_samples`` sequences of ``calib_seq_len`` tokens are used; or a loaded
    ``Calibration``). observer: ``"minmax"``, ``"percentile"`` or ``"mse"``. Side files (config.json,
    tokenizer) are copied. Raises FileNotFoundError / FileExistsError / ValueError before
    writing anything when inputs are wrong; the output appears atomically or not at all.

    smooth: W8A8 (static or dynamic) only, off by default. ``"auto"`` searches alpha per group
    (``quant.smooth.search_alpha``: the alpha of least quantized output error of the group's
    linears on the calib activations, msmodelslim's "flex smooth"); a number in [0, 1] (0.5
    is SmoothQuant's default) uses that alpha everywhere. Either turns on outlier smoothing (``quant.smooth``): for each norm -> linears group of a
    known architecture (``config.json`` ``model_type``, see ``quant.smooth``) the norm's weight
    (and bias) is divided by per-channel factors computed from the calib activations (which
    must be per-channel: module activations or token ids, not only ranges) and the linears'
    weight columns are multiplied by them before quantization; the norms are written FLOAT,
    the activation ranges are observed on the smoothed inputs. In gated MLPs (llama, mistral,
    qwen2/3, phi3) down_proj's input channels are smoothed too, through up_proj's output rows
    (divided by down_proj's factors, whose columns are multiplied by them; exact in float);
    o_proj and starcoder2's c_proj are not smoothed. Streaming: a group's tensors (norm, its
    linears and, for the MLP, down_proj) are handled together when the first of them comes up;
    its linears are read one at a time (twice: column maxima, then scale + quantize), so memory
    stays at about one linear as without smoothing.
    """
    t0 = time.monotonic()
    if not isinstance(config, Scheme):
        raise TypeError(f"config: expected a quant.schemes scheme, got {type(config).__name__}")
    if not config.is_quantized:
        raise ValueError("config: FLOAT is not a quantization scheme")
    if model_dtype is not None and model_dtype not in _FLOATS:
        raise ValueError(f"model_dtype: must be float16, bfloat16 or float32, got {model_dtype}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"model directory not found: {src}")
    if dst.exists() and not force:
        raise FileExistsError(f"output {dst} already exists; use --force to replace it")
    if dst.resolve() == src.resolve():
        raise ValueError("output directory must differ from the model directory")
    skip = tuple(skip)
    static = isinstance(config, W8A8) and not config.dynamic
    if smooth is not None:
        _check_smooth(smooth, config, calib)
    with CheckpointReader(src) as reader:
        if reader.description is not None and reader.model_quant_type != "FLOAT":
            raise ValueError(f"{src} is already quantized ({reader.model_quant_type})")
        # ---- plan and validate, before touching the output ----------------------------------
        layers: dict[str, tuple[int, int]] = {}
        errors: list[str] = []
        for name in reader.names():
            info = reader.info(name)
            if not name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in _FLOATS:
                continue
            module = name[: -len(".weight")]
            if is_skipped(module, skip):
                continue
            n, k = info.shape
            try:
                config.validate_layer(n, k)
            except ValueError as e:
                errors.append(f"{module} (n={n}, k={k}): {e}")
            layers[module] = (n, k)
        if errors:
            raise ValueError(
                "cannot quantize with "
                + config.name
                + ":\n  "
                + "\n  ".join(errors)
                + "\n(use --skip PATTERN to keep such layers in float)"
            )
        if not layers:
            raise ValueError(f"no 2-D float '*.weight' tensors to quantize in {src}")
        cal: Calibration | None
        if calib is None or isinstance(calib, Calibration):
            cal = calib
        else:
            cal = load_calibration(
                calib, model_dir=src, samples=calib_samples, seq_len=calib_seq_len
            )
        if static:
            if cal is None:
                raise ValueError(
                    "static W8A8 needs calibration data: pass --calib FILE "
                    "(or use --scheme w8a8_dynamic)"
                )
            missing = sorted(set(layers) - cal.modules())
            if missing:
                held = sorted(cal.modules())
                raise ValueError(
                    f"calib data has no inputs for {len(missing)} layer(s): "
                    + ", ".join(missing[:6])
                    + (" ..." if len(missing) > 6 else "")
                    + f"; it holds {len(held)} entr{'y' if len(held) == 1 else 'ies'}"
                    + (
                        ": " + ", ".join(held[:6]) + (" ..." if len(held) > 6 else "")
                        if held
                        else ""
                    )
                    + " (add them to the calib file or --skip them)"
                )

        groups: list[SmoothGroup] = []
        downs: list[DownSmoothGroup | None] = []  # per group: the up -> down pair it carries
        member: dict[str, int] = {}  # tensor name -> index of its smooth group
        if smooth is not None:
            assert cal is not None
            groups, downs = _plan_smoothing(reader, src, cal)
            for i, (g, dg) in enumerate(zip(groups, downs, strict=True)):
                for mod in (g.norm, *g.linears, *(() if dg is None else (dg.down,))):
                    for suffix in ("weight", "bias"):
                        if f"{mod}.{suffix}" in reader:
                            member[f"{mod}.{suffix}"] = i

        result = ConvertResult(out_dir=dst, scheme=config.name)
        done: set[int] = set()
        bar = _Progress(len(reader.names()), progress)
        try:
            with CheckpointWriter(dst, max_shard_bytes=max_shard_size, force=force) as writer:
                for _file, infos in reader.infos_by_file():
                    for info in infos:
                        name = info.name
                        module = name.rpartition(".")[0]
                        if name in member:
                            if member[name] not in done:
                                done.add(member[name])
                                _convert_group(
                                    reader,
                                    writer,
                                    groups[member[name]],
                                    downs[member[name]],
                                    smooth,  # type: ignore[arg-type]
                                    layers,
                                    config,
                                    cal,
                                    observer,
                                    percentile,
                                    act_symmetric,
                                    model_dtype,
                                    report,
                                    result,
                                )
                            bar.update(name)
                            continue
                        if name.endswith(".bias") and module in layers:
                            bar.update(name)  # written with its weight
                            continue
                        if name.endswith(".weight") and module in layers:
                            _convert_layer(
                                reader,
                                writer,
                                module,
                                config,
                                cal,
                                observer,
                                percentile,
                                act_symmetric,
                                model_dtype,
                                report,
                                result,
                            )
                        else:
                            t = reader.get_tensor(name)
                            if model_dtype is not None and t.dtype in _FLOATS:
                                t = t.to(model_dtype)
                            writer.add(name, t, "FLOAT")
                            result.kept_float.append(name)
                        bar.update(name)
                for side in sorted(src.iterdir()):
                    if (
                        side.is_file()
                        and side.name not in (INDEX_FILE, DESCRIPTION_FILE)
                        and not side.name.endswith(_WEIGHT_FILE_SUFFIXES)
                    ):
                        writer.copy_file(side)
                group = config.group_size if isinstance(config, W8A16) else 0
                writer.flush()
                result.shards = writer.num_shards
                writer.commit(config.name, group_size=group)
        finally:
            bar.close()
    result.seconds = time.monotonic() - t0
    if log is not None:
        log(result.summary())
    return result


def _check_smooth(smooth: float | str, config: Scheme, calib: object) -> None:
    if not isinstance(config, W8A8):
        raise ValueError(
            f"smoothing applies to W8A8 (static or dynamic) only (scheme {config.name}); "
            "drop --smooth or use --scheme w8a8 / w8a8_dynamic"
        )
    if smooth != "auto" and (isinstance(smooth, (bool, str)) or not 0.0 <= float(smooth) <= 1.0):
        raise ValueError(f"smoothing alpha: must be 'auto' or a number in [0, 1], got {smooth!r}")
    if calib is None:
        raise ValueError(
            "smoothing needs calibration activations: pass --calib FILE "
            "(text, prompts, per-module activations or token ids)"
        )


def _convert_layer(
    reader: CheckpointReader,
    writer: CheckpointWriter,
    module: str,
    config: Scheme,
    cal: Calibration | None,
    observer: str,
    percentile: float,
    act_symmetric: bool,
    model_dtype: torch.dtype | None,
    report: bool,
    result: ConvertResult,
    *,
    smoothed: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: tuple[torch.Tensor, bool] | None = None,
) -> None:
    """Quantize and write one layer. smoothed: (scales (k,), the group's original inputs
    (rows, k)): the weight columns are multiplied by the scales and the activation range is
    observed on inputs / scales. rows: (down_proj's factors, up_half): the output rows of this
    up linear (weight and bias) are divided by them (``quant.smooth.scale_up_rows``)."""
    weight = reader.get_tensor(f"{module}.weight")
    bias = reader.get_tensor(f"{module}.bias") if f"{module}.bias" in reader else None
    static = isinstance(config, W8A8) and not config.dynamic
    dt = model_dtype or weight.dtype
    if rows is not None:
        weight, bias = scale_up_rows(weight, bias, rows[0], rows[1])
    acts = cal.activations.get(module) if cal is not None else None
    if smoothed is not None:
        scales, group_acts = smoothed
        weight = weight.to(torch.float32) * scales
        acts = (group_acts if acts is None else acts) / scales
        obs = make_observer(observer, percentile)
        obs.update(acts)
        act_range = obs.range()
    else:
        act_range = cal.range_of(module, observer, percentile) if static and cal else None
    tensors = quantize_linear(
        weight, bias, config, model_dtype=dt, act_range=act_range, act_symmetric=act_symmetric
    )
    for suffix, t in tensors.items():
        writer.add(f"{module}.{suffix}", t, config.name)
    result.quantized.append(module)
    if report:
        result.reports.append(layer_report(module, weight, bias, tensors, config, acts, dt))


def _plan_smoothing(
    reader: CheckpointReader, src: Path, cal: Calibration
) -> tuple[list[SmoothGroup], list[DownSmoothGroup | None]]:
    """The smooth groups of the model in ``src`` and, per group, the up -> down pair whose up
    linear it contains (or None), validated (shapes, calib activations)."""
    model_type, heads = _arch(src)
    groups = find_smooth_groups(model_type, reader.names())
    pairs = find_down_smooth_groups(model_type, reader.names(), heads)
    by_up = {d.up: d for d in pairs}
    downs: list[DownSmoothGroup | None] = []
    for g in groups:
        ds = [by_up.pop(m) for m in g.linears if m in by_up]
        downs.append(ds[0] if ds else None)
    errors: list[str] = [f"{d.up}: not fed by a smoothed norm" for d in by_up.values()]
    for d in (d for d in downs if d is not None):
        n_up = reader.info(f"{d.up}.weight").shape[0]
        down_shape = tuple(reader.info(f"{d.down}.weight").shape)
        want = (n_up // (2 if d.up_half else 1), n_up)
        if d.heads is not None:
            want = (d.heads[0] * d.heads[2], d.heads[1] * d.heads[2])
        if len(down_shape) != 2 or (down_shape[1], n_up) != want:
            errors.append(
                f"{d.down}: weight {list(down_shape)} vs {d.up}'s {n_up} outputs"
                + ("" if d.heads is None else f" (heads, kv heads, head_dim {d.heads})")
            )
        if d.down not in cal.activations or cal.activations[d.down].numel() == 0:
            errors.append(
                f"{d.down}: no calib activations (smoothing needs per-channel inputs, not "
                "only .input_min/.input_max ranges)"
            )
    for g in groups:
        shape = tuple(reader.info(f"{g.norm}.weight").shape)
        ks = {tuple(reader.info(f"{m}.weight").shape)[1:] for m in g.linears}
        if len(shape) != 1 or ks != {shape}:
            errors.append(f"{g.norm}: weight {list(shape)} vs its linears' in_features {ks}")
        if f"{g.norm}.bias" in reader and tuple(reader.info(f"{g.norm}.bias").shape) != shape:
            errors.append(f"{g.norm}: bias shape differs from its weight")
        if not any(m in cal.activations for m in g.linears):
            errors.append(
                f"{g.norm}: no calib activations for any of {', '.join(g.linears)} "
                "(smoothing needs per-channel inputs, not only .input_min/.input_max ranges)"
            )
    if errors:
        raise ValueError("cannot smooth:\n  " + "\n  ".join(errors[:8]))
    return groups, downs


def _arch(src: Path) -> tuple[str | None, tuple[int, int, int] | None]:
    """(model_type, (attention heads, kv heads, head_dim) or None) from src/config.json."""
    cfg = src / "config.json"
    if not cfg.is_file():
        raise ValueError(f"smoothing needs {cfg} (its model_type names the architecture)")
    try:
        c = json.loads(cfg.read_text())
        h = c.get("num_attention_heads")
        kv = c.get("num_key_value_heads") or h
        hd = c.get("head_dim") or (c["hidden_size"] // h if h and c.get("hidden_size") else None)
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"smoothing: cannot read {cfg}: {e}") from e
    ok = all(isinstance(v, int) and v > 0 for v in (h, kv, hd)) and h % kv == 0
    return c.get("model_type"), ((h, kv, hd) if ok else None)


def _convert_group(
    reader: CheckpointReader,
    writer: CheckpointWriter,
    group: SmoothGroup,
    down: DownSmoothGroup | None,
    alpha: float | str,
    layers: dict[str, tuple[int, int]],
    config: Scheme,
    cal: Calibration | None,
    observer: str,
    percentile: float,
    act_symmetric: bool,
    model_dtype: torch.dtype | None,
    report: bool,
    result: ConvertResult,
) -> None:
    """Smooth one norm -> linears group and write the norm (FLOAT) and its linears; with
    ``down``, also smooth down_proj's input through the up linear's output rows and write
    down_proj.

    Reads the linears one at a time: first their column maxima, then each again to scale and
    quantize it (bounded memory: about one linear, as without smoothing)."""
    assert cal is not None
    acts = next(cal.activations[m] for m in group.linears if m in cal.activations)
    act_max = group_act_absmax(group, cal.activations)
    assert act_max is not None
    # down_proj's factors first: they depend on down_proj alone, and the up linear's column
    # maxima below must be those of the weight that will be quantized (rows already divided)
    rows: tuple[torch.Tensor, bool] | None = None
    if down is not None:
        down_acts = cal.activations[down.down]
        d_act = down_acts.reshape(-1, down_acts.shape[-1]).abs().amax(dim=0).to(torch.float32)
        d_wt = reader.get_tensor(f"{down.down}.weight")
        d_w = d_wt.abs().amax(dim=0).to(torch.float32)
        a_d = _alpha(alpha, down_acts, [d_wt], d_act, config, observer, percentile, down.factors)
        result.alphas[down.down] = a_d
        row_s, col_s = down.factors(d_act, d_w, a_d)
        rows = (row_s, down.up_half)
    w_max = None
    kept: list[torch.Tensor] = []  # the group's weights, for the alpha search only
    for m in group.linears:
        w = reader.get_tensor(f"{m}.weight")
        if down is not None and m == down.up:
            assert rows is not None
            w, _ = scale_up_rows(w, None, rows[0], rows[1])
        if alpha == "auto":
            kept.append(w)
        col = w.abs().amax(dim=0).to(torch.float32)
        w_max = col if w_max is None else torch.maximum(w_max, col)
    assert w_max is not None
    a_g = _alpha(alpha, acts, kept, act_max, config, observer, percentile)
    result.alphas[group.norm] = a_g
    del kept
    scales = smooth_scales(act_max, w_max, a_g)
    norm_w = reader.get_tensor(f"{group.norm}.weight")
    norm_b = reader.get_tensor(f"{group.norm}.bias") if f"{group.norm}.bias" in reader else None
    new_w, new_b, eff = apply_smoothing(norm_w, norm_b, scales, model_dtype or norm_w.dtype)
    writer.add(f"{group.norm}.weight", new_w, "FLOAT")
    result.kept_float.append(f"{group.norm}.weight")
    if new_b is not None:
        writer.add(f"{group.norm}.bias", new_b, "FLOAT")
        result.kept_float.append(f"{group.norm}.bias")
    result.smoothed.append(group.norm)
    for m in group.linears:
        up_rows = rows if down is not None and m == down.up else None
        if m in layers:
            _convert_layer(
                reader,
                writer,
                m,
                config,
                cal,
                observer,
                percentile,
                act_symmetric,
                model_dtype,
                report,
                result,
                smoothed=(eff, acts),
                rows=up_rows,
            )
            continue
        # kept float (--skip): still consumes the smoothed norm, so its columns are scaled too
        _write_float_linear(reader, writer, m, model_dtype, result, eff, up_rows)
    if down is None:
        return
    result.smoothed_down.append(down.down)
    assert rows is not None
    if down.down in layers:
        _convert_layer(
            reader,
            writer,
            down.down,
            config,
            cal,
            observer,
            percentile,
            act_symmetric,
            model_dtype,
            report,
            result,
            smoothed=(col_s, cal.activations[down.down]),
        )
    else:
        _write_float_linear(reader, writer, down.down, model_dtype, result, col_s, None)


def _alpha(
    alpha: float | str,
    acts: torch.Tensor,
    weights: list[torch.Tensor],
    act_max: torch.Tensor,
    config: Scheme,
    observer: str,
    percentile: float,
    tied: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> float:
    """``alpha`` itself, or for ``"auto"`` the searched one (``quant.smooth.search_alpha``);
    tied: a v -> o / up -> down pair's ``factors`` (the searched layer's column factors)."""
    if alpha != "auto":
        return float(alpha)
    best, _ = search_alpha(
        acts,
        weights,
        config,
        act_absmax=act_max,
        observer=observer,
        percentile=percentile,
        factors=None if tied is None else (lambda a, w, al: tied(a, w, al)[1]),
    )
    return best


def _write_float_linear(
    reader: CheckpointReader,
    writer: CheckpointWriter,
    module: str,
    model_dtype: torch.dtype | None,
    result: ConvertResult,
    col_scales: torch.Tensor,
    rows: tuple[torch.Tensor, bool] | None,
) -> None:
    """Write a smoothed linear that is kept float (--skip): weight columns multiplied by
    ``col_scales``, and with ``rows`` its output rows divided by down_proj's factors."""
    name_w, name_b = f"{module}.weight", f"{module}.bias"
    w = reader.get_tensor(name_w)
    b = reader.get_tensor(name_b) if name_b in reader else None
    dt, bdt = model_dtype or w.dtype, None if b is None else (model_dtype or b.dtype)
    w = w.to(torch.float32) * col_scales
    if rows is not None:
        w, b = scale_up_rows(w, b, rows[0], rows[1])
    writer.add(name_w, w.to(dt), "FLOAT")
    result.kept_float.append(name_w)
    if b is not None:
        writer.add(name_b, b.to(bdt), "FLOAT")
        result.kept_float.append(name_b)
