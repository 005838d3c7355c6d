"""The conversions between msmodelslim's stored conventions and the kernels' arguments.

Every sign flip and bit reinterpretation between a checkpoint and a kernel call lives here, so
that there is exactly one place to get it right:

- Offsets. msmodelslim stores ``weight_offset`` with the meaning ``w ~ (q - offset) * scale``
  (its docs: ``deq_weight = (weight - weight_offset) * weight_scale``). The NPU kernels
  (npu_weight_quant_batchmatmul, npu_mm_all_reduce_base W8A16) compute
  ``(q + antiquant_offset) * antiquant_scale``. Hence ``antiquant_offset = -weight_offset``:
  :func:`to_antiquant_offset`. (msmodelslim's docs: "the NPU op computes (weight +
  weight_offset) * weight_scale; the Ascend inference framework negates it when loading".)
- Activation offsets keep their sign: ``x_q = rint(x / input_scale + input_offset)`` is exactly
  npu_quantize's ``div_mode`` formula with ``zero_points = input_offset``.
- ``deq_scale`` of fp16 models is stored as int64 holding the float32 bit pattern (zero-extended,
  no flag bit): :func:`deq_scale_to_int64` / :func:`deq_scale_to_float32`. The layers pack it for
  the kernel with ``ascend_ops.quant_param.trans_quant_param(deq_scale_to_float32(t))``.
"""

from __future__ import annotations

import torch

__all__ = [
    "deq_scale_to_float32",
    "deq_scale_to_int64",
    "from_antiquant_offset",
    "to_antiquant_offset",
]


def to_antiquant_offset(weight_offset: torch.Tensor) -> torch.Tensor:
    """msmodelslim ``weight_offset`` (``w ~ (q - offset) * scale``) -> the kernels'
    ``antiquant_offset`` (``w ~ (q + offset) * scale``): the negation, same shape and dtype.

    This is the ONLY place the sign is flipped; layers call it in
    ``process_weights_after_loading`` (before any transpose / reshape they also need).
    """
    if not isinstance(weight_offset, torch.Tensor) or not weight_offset.is_floating_point():
        raise TypeError(
            "weight_offset: must be a floating tensor, got "
            f"{getattr(weight_offset, 'dtype', type(weight_offset))}"
        )
    return -weight_offset


def from_antiquant_offset(antiquant_offset: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_antiquant_offset` (the same negation)."""
    return to_antiquant_offset(antiquant_offset)


def deq_scale_to_int64(scale: torch.Tensor) -> torch.Tensor:
    """float32 deq_scale [n] -> int64 [n] holding the float32 bits zero-extended
    (``bits & 0xFFFFFFFF``), as msmodelslim stores it for fp16 models. Exact and reversible."""
    if not scale.is_floating_point():
        raise TypeError(f"scale: must be a floating tensor, got {scale.dtype}")
    return scale.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def deq_scale_to_float32(deq_scale: torch.Tensor) -> torch.Tensor:
    """A stored deq_scale (float32, or int64 with the float32 bits in the low 32 bits, whether
    zero- or sign-extended, or even packed by trans_quant_param) -> float32, bit-exact."""
    if deq_scale.dtype in (torch.int64, torch.uint64):
        low = deq_scale.contiguous().view(torch.int64) & 0xFFFFFFFF
        return torch.where(low >= 2**31, low - 2**32, low).to(torch.int32).view(torch.float32)
    if deq_scale.is_floating_point():
        return deq_scale.to(torch.float32)
    raise TypeError(f"deq_scale: must be float or int64, got {deq_scale.dtype}")
