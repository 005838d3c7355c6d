"""The smoothing part of a conversion: which norm -> linears groups and producer -> consumer
pairs a checkpoint has (``plan_smoothing``) and converting one group (``convert_group``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from quant.calibration import Calibration
from quant.checkpoint import CheckpointReader, CheckpointWriter
from quant.convert_layer import LayerJob, convert_layer, write_float_linear
from quant.schemes import W8A8, Scheme
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

__all__ = ["check_smooth", "convert_group", "plan_smoothing"]


def check_smooth(smooth: float | str, config: Scheme, calib: object) -> None:
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


def plan_smoothing(
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


def _alpha(
    alpha: float | str,
    acts: torch.Tensor,
    weights: list[torch.Tensor],
    act_max: torch.Tensor,
    job: LayerJob,
    tied: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> float:
    """``alpha`` itself, or for ``"auto"`` the searched one (``quant.smooth.search_alpha``);
    tied: a v -> o / up -> down pair's ``factors`` (the searched layer's column factors)."""
    if alpha != "auto":
        return float(alpha)
    best, _ = search_alpha(
        acts,
        weights,
        job.config,
        act_absmax=act_max,
        observer=job.observer,
        percentile=job.percentile,
        factors=None if tied is None else (lambda a, w, al: tied(a, w, al)[1]),
    )
    return best


def _pair_factors(
    reader: CheckpointReader, down: DownSmoothGroup, alpha: float | str, job: LayerJob
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up's row divisors, down's column factors) of a producer -> consumer pair; they depend
    on down alone, so they come before the group's own factors."""
    assert job.cal is not None
    down_acts = job.cal.activations[down.down]
    d_act = down_acts.reshape(-1, down_acts.shape[-1]).abs().amax(dim=0).to(torch.float32)
    d_wt = reader.get_tensor(f"{down.down}.weight")
    d_w = d_wt.abs().amax(dim=0).to(torch.float32)
    a_d = _alpha(alpha, down_acts, [d_wt], d_act, job, down.factors)
    job.result.alphas[down.down] = a_d
    return down.factors(d_act, d_w, a_d)


def _group_scales(
    reader: CheckpointReader,
    group: SmoothGroup,
    up: tuple[str, torch.Tensor, bool] | None,
    alpha: float | str,
    acts: torch.Tensor,
    job: LayerJob,
) -> torch.Tensor:
    """The norm group's factors (k,), from its linears' column maxima (the up linear's rows
    already divided), read one at a time (kept only for the alpha search)."""
    assert job.cal is not None
    act_max = group_act_absmax(group, job.cal.activations)
    assert act_max is not None
    w_max = None
    kept: list[torch.Tensor] = []
    for m in group.linears:
        w = reader.get_tensor(f"{m}.weight")
        if up is not None and m == up[0]:
            w, _ = scale_up_rows(w, None, up[1], up[2])
        if alpha == "auto":
            kept.append(w)
        col = w.abs().amax(dim=0).to(torch.float32)
        w_max = col if w_max is None else torch.maximum(w_max, col)
    assert w_max is not None
    a_g = _alpha(alpha, acts, kept, act_max, job)
    job.result.alphas[group.norm] = a_g
    return smooth_scales(act_max, w_max, a_g)


def _write_norm(
    reader: CheckpointReader,
    writer: CheckpointWriter,
    group: SmoothGroup,
    scales: torch.Tensor,
    job: LayerJob,
) -> torch.Tensor:
    """Write the smoothed norm (FLOAT); returns the effective column factors."""
    norm = group.norm
    norm_w = reader.get_tensor(f"{norm}.weight")
    norm_b = reader.get_tensor(f"{norm}.bias") if f"{norm}.bias" in reader else None
    new_w, new_b, eff = apply_smoothing(
        norm_w, norm_b, scales, job.model_dtype or norm_w.dtype, group.offset
    )
    writer.add(f"{norm}.weight", new_w, "FLOAT")
    job.result.kept_float.append(f"{norm}.weight")
    if new_b is not None:
        writer.add(f"{norm}.bias", new_b, "FLOAT")
        job.result.kept_float.append(f"{norm}.bias")
    job.result.smoothed.append(norm)
    return eff


def convert_group(
    reader: CheckpointReader,
    writer: CheckpointWriter,
    group: SmoothGroup,
    down: DownSmoothGroup | None,
    alpha: float | str,
    layers: dict[str, tuple[int, int]],
    job: LayerJob,
) -> None:
    """Smooth one norm -> linears group and write the norm (FLOAT) and its linears; with
    ``down``, also smooth down's input through the up linear's output rows and write down.
    Memory: about one linear at a time (one group with ``alpha="auto"``)."""
    assert job.cal is not None
    acts = next(job.cal.activations[m] for m in group.linears if m in job.cal.activations)
    up, col_s = None, None
    if down is not None:
        row_s, col_s = _pair_factors(reader, down, alpha, job)
        up = (down.up, row_s, down.up_half)
    eff = _write_norm(
        reader, writer, group, _group_scales(reader, group, up, alpha, acts, job), job
    )
    for m in group.linears:
        up_rows = (up[1], up[2]) if up is not None and m == up[0] else None
        if m in layers:
            convert_layer(reader, writer, m, job, smoothed=(eff, acts), rows=up_rows)
        else:  # kept float: still consumes the smoothed norm, so its columns are scaled too
            write_float_linear(reader, writer, m, job, eff, up_rows)
    if down is None or col_s is None:
        return
    job.result.smoothed_down.append(down.down)
    if down.down in layers:
        convert_layer(
            reader, writer, down.down, job, smoothed=(col_s, job.cal.activations[down.down])
        )
    else:
        write_float_linear(reader, writer, down.down, job, col_s, None)
