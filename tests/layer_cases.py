"""Full-model-side helpers for the layer tests: seeded full weights, their checkpoint tensors
per scheme (via quant), an unsharded float64 reference, and the tolerance."""

from __future__ import annotations

import torch

from quant.algorithms import ActivationRange, dequantize_linear, quantize_linear
from quant.schemes import FP, W8A8, W8A16, Scheme

SCHEMES: dict[str, Scheme] = {
    "fp": FP(),
    "w8a16": W8A16(),
    "w8a16_g32_asym": W8A16(group_size=32, symmetric=False),
    "w8a8": W8A8(),
    "w8a8_dynamic": W8A8(dynamic=True),
}
DT = torch.bfloat16
U = 2.0**-8  # bf16 unit roundoff


def make_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Activations with a few outlier channels (as real LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., :3] *= 8.0
    return x.to(DT)


def make_linear(n: int, k: int, bias: bool, scheme: Scheme, seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (suffix -> full tensor) of a seeded (n, k) linear layer."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) * 0.1 if bias else None
    act = ActivationRange(-8.0 * 4, 8.0 * 4)
    return quantize_linear(
        w.to(DT), b.to(DT) if b is not None else None, scheme, model_dtype=DT, act_range=act
    )


def _quant_input64(x: torch.Tensor, t: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """The activation the quantized kernels effectively see, dequantized, in float64."""
    x = x.double()
    if not isinstance(scheme, W8A8):
        return x
    if scheme.dynamic:
        xf = x.float()
        rowmax = xf.abs().amax(-1, keepdim=True)
        inv = torch.where(rowmax > 0, 127.0 / rowmax, torch.ones_like(rowmax))
        return (torch.round(xf * inv).clamp(-128, 127) / inv).double()
    s = t["input_scale"].double()
    off = t["input_offset"].double()
    q = torch.round(x.float() / s.float() + off.float()).clamp(-128, 127).double()
    return (q - off) * s


def reference64(
    x: torch.Tensor, t: dict[str, torch.Tensor], scheme: Scheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference output, magnitude bound) in float64 for the full unsharded layer: an
    nn.Linear holding the dequantized full weight, fed the (de)quantized activation."""
    w, b = dequantize_linear(dict(t), scheme)
    w = w.double()
    xq = _quant_input64(x, t, scheme)
    y = xq @ w.t()
    mag = xq.abs() @ w.abs().t()
    if b is not None:
        y = y + b.double()
        mag = mag + b.double().abs()
    return y, mag


def tolerance(mag: torch.Tensor, ws: int, scheme: Scheme) -> torch.Tensor:
    """(ws + 4) bf16 roundings of the magnitude bound (per-rank result, reduction, dequantized
    weight, bias), plus 2^-8 relative for a bf16 dequant scale (W8A8 on bf16 models), plus the
    folded-bias rounding of static W8A8 (|round(b/deq) - b/deq| <= 1/2 deq)."""
    tol = (ws + 4) * U * mag + 1e-6
    if isinstance(scheme, W8A8):
        tol = tol + U * mag + 1e-3
    return tol
