"""One linear of a conversion: (optionally smoothed) weight -> min-max or GPTQ int8 ->
checkpoint tensors, written; and smoothed linears kept float."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.algorithms import QuantizedWeight, quantize_linear
from quant.calibration import Calibration, make_observer
from quant.checkpoint import CheckpointReader, CheckpointWriter
from quant.gptq import gptq_quantize_weight, hessian
from quant.report import ConvertResult, layer_report
from quant.schemes import W8A8, W8A16, Scheme
from quant.smooth import scale_up_rows

__all__ = ["LayerJob", "convert_layer", "write_float_linear"]


@dataclass
class LayerJob:
    """The settings every layer of one conversion shares, and where results go."""

    config: Scheme
    cal: Calibration | None
    result: ConvertResult
    observer: str = "minmax"
    percentile: float = 99.99
    act_symmetric: bool = False
    model_dtype: torch.dtype | None = None
    report: bool = False
    gptq: bool = False

    @property
    def static(self) -> bool:
        return isinstance(self.config, W8A8) and not self.config.dynamic


def _gptq_weight(
    weight: torch.Tensor, acts: torch.Tensor, config: Scheme, dtype: torch.dtype
) -> QuantizedWeight:
    """GPTQ int8 weight with the scheme's granularity (W8A8: per-channel symmetric)."""
    if isinstance(config, W8A16):
        g, sym = config.group_size, config.symmetric
    else:
        g, sym = 0, True
    return gptq_quantize_weight(
        weight, hessian(acts), group_size=g, symmetric=sym, scale_dtype=dtype
    )


def convert_layer(
    reader: CheckpointReader,
    writer: CheckpointWriter,
    module: str,
    job: LayerJob,
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
    cal, config = job.cal, job.config
    dt = job.model_dtype or weight.dtype
    if rows is not None:
        weight, bias = scale_up_rows(weight, bias, rows[0], rows[1])
    acts = cal.activations.get(module) if cal is not None else None
    act_range = None
    if smoothed is not None:
        scales, group_acts = smoothed
        weight = weight.to(torch.float32) * scales
        acts = (group_acts if acts is None else acts) / scales
        obs = make_observer(job.observer, job.percentile)
        obs.update(acts)
        act_range = obs.range()
    elif job.static and cal is not None:
        act_range = cal.range_of(module, job.observer, job.percentile)
    qweight = None
    if job.gptq:
        assert acts is not None  # validated by quantize_checkpoint
        qweight = _gptq_weight(weight, acts, config, dt)
    tensors = quantize_linear(
        weight,
        bias,
        config,
        model_dtype=dt,
        act_range=act_range,
        act_symmetric=job.act_symmetric,
        qweight=qweight,
    )
    for suffix, t in tensors.items():
        writer.add(f"{module}.{suffix}", t, config.name)
    job.result.quantized.append(module)
    if job.report:
        job.result.reports.append(layer_report(module, weight, bias, tensors, config, acts, dt))


def write_float_linear(
    reader: CheckpointReader,
    writer: CheckpointWriter,
    module: str,
    job: LayerJob,
    col_scales: torch.Tensor,
    rows: tuple[torch.Tensor, bool] | None,
) -> None:
    """Write a smoothed linear that is kept float (--skip / --exclude): weight columns
    multiplied by ``col_scales``, and with ``rows`` its output rows divided by the factors."""
    name_w, name_b = f"{module}.weight", f"{module}.bias"
    w = reader.get_tensor(name_w)
    b = reader.get_tensor(name_b) if name_b in reader else None
    md = job.model_dtype
    dt, bdt = md or w.dtype, None if b is None else (md or b.dtype)
    w = w.to(torch.float32) * col_scales
    if rows is not None:
        w, b = scale_up_rows(w, b, rows[0], rows[1])
    writer.add(name_w, w.to(dt), "FLOAT")
    job.result.kept_float.append(name_w)
    if b is not None:
        writer.add(name_b, b.to(bdt), "FLOAT")
        job.result.kept_float.append(name_b)
