"""GPTQ: error-compensating int8 weight rounding (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", Algorithm 1).

For a linear W (n, k) with calibration inputs X (rows, k), GPTQ minimises
``||X W^T - X W_hat^T||^2`` column by column: after rounding column j it spreads the rounding
error onto the not yet rounded columns through the inverse Hessian ``H^-1``, ``H = 2 X^T X /
rows + damp * mean(diag) * I``, processed in blocks of ``block_size`` columns (lazy batch
updates) from the upper Cholesky factor of ``H^-1``. Scales and offsets are min-max
(``quant.algorithms.weight_qparams``): per output channel from the whole weight, per group
from the group's columns as updated when the group is reached; the result is stored exactly as
min-max weights are (the same msmodelslim tensors), so loaders need nothing new.
"""

from __future__ import annotations

import torch

from quant.algorithms import QuantizedWeight, weight_qparams

__all__ = ["gptq_quantize_weight", "hessian"]


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / rows`` (k, k) float64 of inputs x (..., k)."""
    xf = x.reshape(-1, x.shape[-1]).to(torch.float64)
    if xf.shape[0] == 0:
        raise ValueError("gptq: no calibration rows for the Hessian")
    return 2.0 * (xf.t() @ xf) / xf.shape[0]


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1."""
    k = h.shape[0]
    d = h.diagonal().mean().clamp_min(1e-12) * damp
    for _ in range(6):  # escalate the damping until H is numerically positive definite
        try:
            lower = torch.linalg.cholesky(h + d * torch.eye(k, dtype=h.dtype))
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            d = d * 10
    raise ValueError("gptq: the Hessian is not positive definite even with damping")


def gptq_quantize_weight(
    weight: torch.Tensor,
    h: torch.Tensor,
    *,
    group_size: int = 0,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> QuantizedWeight:
    """GPTQ int8 weights of W (n, k) float for the Hessian h (k, k) (see ``hessian``).

    group_size: 0 (per-channel scales) or g dividing k (per-group; blocks are rounded to a
    multiple of g). Returns the same ``QuantizedWeight`` as ``quantize_weight``: qweight
    (n, k) int8, scale / offset (n, 1) or (n, k // g) in ``scale_dtype`` (default: weight's).
    """
    n, k = weight.shape
    if h.shape != (k, k):
        raise ValueError(f"gptq: Hessian {list(h.shape)} for a weight of k = {k}")
    if group_size and k % group_size:
        raise ValueError(f"group_size {group_size} does not divide k = {k}")
    dt = scale_dtype or weight.dtype
    w = weight.to(torch.float32).clone()
    h = h.to(torch.float64).clone()
    dead = h.diagonal() == 0  # inputs never active: their columns do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_factor(h, damp).to(torch.float32)
    if group_size:
        block_size = max(group_size, block_size // group_size * group_size)
        scale = torch.empty(n, k // group_size, dtype=dt)
        offset = torch.empty_like(scale)
    else:
        scale, offset = weight_qparams(w.to(torch.float32).unsqueeze(1), symmetric, dt)
    q = torch.empty(n, k, dtype=torch.int8)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.zeros_like(wb)
        for i in range(b1 - b0):
            j = b0 + i
            if group_size and j % group_size == 0:
                g = j // group_size
                sg, og = weight_qparams(
                    wb[:, i : i + group_size].to(torch.float32).unsqueeze(1), symmetric, dt
                )
                scale[:, g : g + 1], offset[:, g : g + 1] = sg, og
            col = j // group_size if group_size else 0
            s = scale[:, col].to(torch.float32)
            o = offset[:, col].to(torch.float32)
            qi = torch.round(wb[:, i] / s + o).clamp(-128, 127)
            q[:, j] = qi.to(torch.int8)
            e = (wb[:, i] - (qi - o) * s) / ub[i, i]
            wb[:, i:] -= e.unsqueeze(1) * ub[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return QuantizedWeight(q, scale, offset, group_size)
