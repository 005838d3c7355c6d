"""What a conversion did and how good each quantized layer is: ``ConvertResult``,
``LayerReport`` (``--report``) and its table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quant.algorithms import dequantize_linear
from quant.convention import deq_scale_to_float32
from quant.modules import QuantLinear
from quant.schemes import Scheme

__all__ = ["ConvertResult", "LayerReport", "format_report", "layer_report"]


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
    excluded: list[str] = field(default_factory=list)  # linears kept FLOAT by exclude/fallback
    load_dtype: str = ""  # the dtype a loader must use, when the scheme restricts it
    shards: int = 0
    reports: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        smooth = ""
        if self.smoothed:
            down = f" and {len(self.smoothed_down)} o_proj/down_proj" if self.smoothed_down else ""
            smooth = f" (smoothed the inputs of {len(self.smoothed)} norms{down})"
        fallback = f" ({len(self.excluded)} linears excluded)" if self.excluded else ""
        return (
            f"quantized {len(self.quantized)} layers to {self.scheme}{smooth}{fallback}, kept "
            f"{len(self.kept_float)} tensors FLOAT, {self.shards} shard(s) -> {self.out_dir} "
            f"in {self.seconds:.1f}s"
            + (f"; load it with dtype={self.load_dtype}" if self.load_dtype else "")
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
