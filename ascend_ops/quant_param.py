"""`trans_quant_param`: the vendor's packing of a float32 dequant scale into int64, and its inverse.

Bit layout (npu_trans_quant_param, round_mode 0), per element::

    bits  0..31  float32 bits of the scale with the low 13 mantissa bits cleared (& 0xFFFFE000)
    bits 37..45  optional offset: clamp(rint(offset), -256, 255) as 9-bit two's complement
    bit  46      always 1 (marks a packed scale)

The fused op and the quant matmul only read bits 0..31 (the offset is for int8 re-quant output).
"""

from __future__ import annotations

import torch

__all__ = ["trans_quant_param", "unpack_quant_param", "truncate_scale"]

_SCALE_MASK = 0xFFFFE000
_FLAG = 1 << 46
_OFFSET_SHIFT = 37
_OFFSET_MASK = 0x1FF


def _float32_bits(t: torch.Tensor) -> torch.Tensor:
    """float32 tensor -> int64 tensor holding its 32 bits as an unsigned value."""
    return t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def trans_quant_param(scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a float32 dequant scale (and optional offset) into the vendor's int64 format.

    scale: (n,) or (1,) (any shape is packed element-wise), float32 (other floats are cast).
    offset: optional, broadcast against scale (1-D [1] vs [n] both ways), rounded half to even
    and clamped to [-256, 255]. Returns int64 with the broadcast shape. On an NPU tensor this
    calls torch_npu.npu_trans_quant_param. Raises TypeError for a non-float scale or a
    non-tensor offset, ValueError for shapes that do not broadcast or a NaN offset.
    """
    from ascend_ops import backend

    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(
            f"scale: must be a floating tensor, got {getattr(scale, 'dtype', type(scale))}"
        )
    if offset is not None:
        if not isinstance(offset, torch.Tensor):
            raise TypeError(f"offset: must be a tensor or None, got {type(offset).__name__}")
        try:
            torch.broadcast_shapes(scale.shape, offset.shape)
        except RuntimeError as e:
            raise ValueError(
                f"offset: shape {tuple(offset.shape)} does not broadcast against scale's "
                f"{tuple(scale.shape)} (use [1] or the scale's length)"
            ) from e
    if backend.select(scale) is backend.Backend.ASCEND:
        from ascend_ops import _npu

        return _npu.trans_quant_param(scale, offset)
    bits = _float32_bits(scale.to(torch.float32)) & _SCALE_MASK
    if offset is not None:
        off_f = torch.round(offset.to(torch.float32))
        if bool(torch.isnan(off_f).any()):
            raise ValueError("offset: NaN cannot be packed (rint + clamp to [-256, 255])")
        off = off_f.clamp(-256, 255).to(torch.int64) & _OFFSET_MASK
        bits, off = torch.broadcast_tensors(bits, off)
        bits = bits | (off << _OFFSET_SHIFT)
    return bits | _FLAG


def unpack_quant_param(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of trans_quant_param: int64/uint64 -> (float32 scale, float32 offset), bit-exact.

    packed: any shape. The scale is read as the kernel reads it: bits 0..31 with the low 13
    mantissa bits cleared (a raw int64 whose low bits are set unpacks to the truncated scale)."""
    if packed.dtype not in (torch.int64, torch.uint64):
        raise TypeError(f"packed: must be int64 or uint64, got {packed.dtype}")
    p = packed.contiguous().view(torch.int64) if packed.dtype == torch.uint64 else packed
    low = p & _SCALE_MASK
    scale = torch.where(low >= 2**31, low - 2**32, low).to(torch.int32).view(torch.float32)
    off9 = (p >> _OFFSET_SHIFT) & _OFFSET_MASK
    offset = torch.where(off9 >= 256, off9 - 512, off9).to(torch.float32)
    return scale, offset


def truncate_scale(scale: torch.Tensor) -> torch.Tensor:
    """The float32 scale that trans_quant_param actually keeps (low 13 mantissa bits cleared)."""
    return unpack_quant_param(trans_quant_param(scale))[0]
