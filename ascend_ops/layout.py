"""ND <-> FRACTAL_NZ layout and the storage-format tag (``format_cast`` / ``get_format``).

FRACTAL_NZ (format id 29; ND is 2) stores a ``(.., k, n)`` matrix as
``(.., ceil(n / C0), ceil(k / 16), 16, C0)`` with ``C0 = 32 // min(itemsize, 2)`` elements
(16 for fp16 / bf16 / fp32 / int32, 32 for int8), element ``(i, j)`` at
``[j // C0, i // 16, i % 16, j % C0]`` and zeros in the padding (KERNELS.md, "FRACTAL_NZ").

``nd_to_nz`` / ``nz_to_nd`` convert explicitly between the logical matrix and that storage
tensor (bit-exact, any k and n, any leading batch dims); they are what a checkpoint tool or a
test uses to look at the physical layout.

``format_cast`` / ``get_format`` follow torch_npu's API. On the Ascend backend they call
``torch_npu.npu_format_cast`` / ``torch_npu.get_npu_format``: the device tensor keeps its
logical ``(k, n)`` shape and only its storage changes. On the portable backend the format is
likewise a storage property invisible to the math, so ``format_cast`` returns an *alias* of the
same logical tensor (a new tensor object sharing storage, shape and values) carrying the
requested format in the attribute ``_ascend_format``; ``get_format`` reads it back (ND when the
attribute is absent). The tag is on the returned object only: the input is not modified, and
tensors derived from the alias (slices, ``.contiguous()`` copies, arithmetic results) are ND
again, as a freshly computed tensor is on the device. An ``nn.Parameter`` input gives an
``nn.Parameter`` alias that also keeps the input's other attributes (e.g. ``weight_loader``).
"""

from __future__ import annotations

import torch

from ascend_ops import backend
from ascend_ops.contract import FORMAT_ND, FORMAT_NZ

__all__ = [
    "FORMAT_ND",
    "FORMAT_NZ",
    "c0_of",
    "format_cast",
    "get_format",
    "nd_to_nz",
    "nz_shape",
    "nz_to_nd",
]

_KNOWN_FORMATS = {FORMAT_ND: "ND", FORMAT_NZ: "FRACTAL_NZ"}
_FORMAT_ATTR = "_ascend_format"
_K0 = 16  # rows per fractal


def c0_of(dtype: torch.dtype) -> int:
    """Fractal width C0 in elements: ``32 // min(itemsize, 2)`` (16, or 32 for 1-byte types)."""
    return 32 // min(dtype.itemsize, 2)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def nz_shape(k: int, n: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Storage shape ``(ceil(n / C0), ceil(k / 16), 16, C0)`` of a ``(k, n)`` matrix."""
    c0 = c0_of(dtype)
    return (_cdiv(n, c0), _cdiv(k, _K0), _K0, c0)


def nd_to_nz(t: torch.Tensor) -> torch.Tensor:
    """Logical ``(.., k, n)`` -> FRACTAL_NZ storage ``(.., ceil(n/C0), ceil(k/16), 16, C0)``.

    Any dtype; padding is zero; the result is a new contiguous tensor with t's dtype/device.
    """
    if t.dim() < 2:
        raise ValueError(f"t: nd_to_nz needs a (.., k, n) tensor, got shape {tuple(t.shape)}")
    *lead, k, n = t.shape
    n1, k1, k0, c0 = nz_shape(k, n, t.dtype)
    padded = (
        torch.nn.functional.pad(t, (0, n1 * c0 - n, 0, k1 * k0 - k))
        if (n1 * c0 != n or k1 * k0 != k)
        else t
    )
    blocks = padded.reshape(*lead, k1, k0, n1, c0)
    nd = len(lead)
    perm = [*range(nd), nd + 2, nd, nd + 1, nd + 3]  # (.., n1, k1, k0, c0)
    return blocks.permute(perm).contiguous()


def nz_to_nd(storage: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """FRACTAL_NZ storage ``(.., ceil(n/C0), ceil(k/16), 16, C0)`` -> logical ``(.., k, n)``.

    Inverse of nd_to_nz (the padding is dropped); returns a new contiguous tensor.
    """
    want = nz_shape(k, n, storage.dtype)
    if storage.dim() < 4 or tuple(storage.shape[-4:]) != want:
        raise ValueError(
            f"storage: FRACTAL_NZ of a ({k}, {n}) {storage.dtype} matrix has trailing shape "
            f"{want}, got {tuple(storage.shape)}"
        )
    *lead, n1, k1, k0, c0 = storage.shape
    nd = len(lead)
    perm = [*range(nd), nd + 1, nd + 2, nd, nd + 3]  # (.., k1, k0, n1, c0)
    full = storage.permute(perm).reshape(*lead, k1 * k0, n1 * c0)
    return full[..., :k, :n].contiguous()


def _check_format(fmt: int) -> int:
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt not in _KNOWN_FORMATS:
        known = ", ".join(f"{v}={name}" for v, name in _KNOWN_FORMATS.items())
        raise ValueError(f"format: unknown format id {fmt!r}; supported: {known}")
    return fmt


def format_cast(t: torch.Tensor, fmt: int) -> torch.Tensor:
    """Cast ``t``'s storage to format ``fmt`` (FORMAT_ND or FORMAT_NZ); logical shape unchanged.

    Ascend: ``torch_npu.npu_format_cast(t, fmt)``. Portable: an alias of ``t`` tagged with
    ``fmt`` (see the module docstring). Unknown format ids raise ValueError.
    """
    fmt = _check_format(fmt)
    if backend.select(t) is backend.Backend.ASCEND:
        return backend.npu_module().npu_format_cast(t, fmt)
    if isinstance(t, torch.nn.Parameter):
        out: torch.Tensor = torch.nn.Parameter(t.data, requires_grad=t.requires_grad)
        out.__dict__.update(t.__dict__)
    else:
        out = t.view(t.shape)
    setattr(out, _FORMAT_ATTR, fmt)
    return out


def get_format(t: torch.Tensor) -> int:
    """The storage format id of ``t`` (2 = ND, 29 = FRACTAL_NZ).

    Ascend: ``torch_npu.get_npu_format(t)``. Portable: the tag set by format_cast, else ND.
    """
    if backend.select(t) is backend.Backend.ASCEND:
        return int(backend.npu_module().get_npu_format(t))
    return int(getattr(t, _FORMAT_ATTR, FORMAT_ND))
