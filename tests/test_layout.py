"""ND <-> FRACTAL_NZ layout (KERNELS.md "FRACTAL_NZ") and the format tag."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_ops import backend
from ascend_ops.layout import (
    FORMAT_ND,
    FORMAT_NZ,
    c0_of,
    format_cast,
    get_format,
    nd_to_nz,
    nz_shape,
    nz_to_nd,
)

DTYPES = [torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int32]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of the raw bits, so that equality is bit-exact (NaN, -0.0)."""
    view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize]
    return t.contiguous().view(view)


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int32).to(dtype)


def test_c0() -> None:
    assert c0_of(torch.int8) == 32
    assert c0_of(torch.uint8) == 32
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.int32):
        assert c0_of(dt) == 16


def test_golden_int8_3x40() -> None:
    # C0 = 32: storage (ceil(40/32), ceil(3/16), 16, 32) = (2, 1, 16, 32).
    nd = (torch.arange(120, dtype=torch.int32) + 1).reshape(3, 40).to(torch.int8)  # 1..120
    nz = nd_to_nz(nd)
    assert nz.shape == (2, 1, 16, 32) and nz.dtype == torch.int8
    # nd[i, j] = 40 * i + j + 1 lands at [j // 32, i // 16, i % 16, j % 32].
    assert nz[0, 0, 0, 0] == 1  # (0, 0)
    assert nz[0, 0, 0, 31] == 32  # (0, 31): last column of the first fractal
    assert nz[1, 0, 0, 0] == 33  # (0, 32): first column of the second fractal
    assert nz[0, 0, 1, 0] == 41  # (1, 0)
    assert nz[1, 0, 2, 3] == 116  # (2, 35)
    assert nz[1, 0, 2, 7] == 120  # (2, 39): the last element
    # Padding: columns 40..63 (second fractal, c >= 8) and rows 3..15 are zero.
    assert not nz[1, :, :, 8:].any()
    assert not nz[:, :, 3:, :].any()
    assert int((nz != 0).sum()) == 120
    assert torch.equal(nz_to_nd(nz, 3, 40), nd)


def test_golden_bf16_17x5() -> None:
    # C0 = 16: storage (ceil(5/16), ceil(17/16), 16, 16) = (1, 2, 16, 16).
    nd = (torch.arange(85, dtype=torch.float32) + 1).reshape(17, 5).to(torch.bfloat16)
    nz = nd_to_nz(nd)
    assert nz.shape == (1, 2, 16, 16) and nz.dtype == torch.bfloat16
    # nd[i, j] = 5 * i + j + 1 (exact in bf16 up to 256).
    assert nz[0, 0, 0, 4] == 5  # (0, 4)
    assert nz[0, 0, 15, 0] == 76  # (15, 0): last row of the first fractal
    assert nz[0, 1, 0, 0] == 81  # (16, 0): row 16 starts the second k-fractal
    assert nz[0, 1, 0, 4] == 85  # (16, 4)
    # Padding: columns 5..15 everywhere, rows 17..31 (second k-fractal, r >= 1).
    assert not nz[..., 5:].any()
    assert not nz[0, 1, 1:, :].any()
    assert int((nz != 0).sum()) == 85
    assert torch.equal(nz_to_nd(nz, 17, 5), nd)


def _loop_reference(nd: torch.Tensor) -> torch.Tensor:
    """Element-by-element definition of the layout, independent of the reshape trick."""
    k, n = nd.shape
    c0 = c0_of(nd.dtype)
    out = torch.zeros(nz_shape(k, n, nd.dtype), dtype=nd.dtype)
    for i in range(k):
        for j in range(n):
            out[j // c0, i // 16, i % 16, j % c0] = nd[i, j]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (33, 47), (5, 64)])
def test_matches_element_definition(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    nd = _random(shape, dtype)
    assert torch.equal(_bits(nd_to_nz(nd)), _bits(_loop_reference(nd)))


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 70),
    n=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(k: int, n: int, dtype: torch.dtype, seed: int) -> None:
    nd = _random((k, n), dtype, seed)
    nz = nd_to_nz(nd)
    c0 = c0_of(dtype)
    assert nz.shape == (-(-n // c0), -(-k // 16), 16, c0)
    assert int((_bits(nz) != 0).sum()) == int((_bits(nd) != 0).sum())  # padding is zero
    back = nz_to_nd(nz, k, n)
    assert back.shape == (k, n) and back.dtype == dtype and back.is_contiguous()
    assert torch.equal(_bits(back), _bits(nd))


def test_round_trip_special_float_bits() -> None:
    nd = torch.tensor([[float("nan"), -0.0, float("inf")], [1e-40, -float("inf"), 3.0]])
    assert torch.equal(_bits(nz_to_nd(nd_to_nz(nd), 2, 3)), _bits(nd))


def test_batched_leading_dims() -> None:
    nd = _random((2, 3, 20, 40), torch.int8)
    nz = nd_to_nz(nd)
    assert nz.shape == (2, 3, 2, 2, 16, 32)
    for a in range(2):
        for b in range(3):
            assert torch.equal(nz[a, b], nd_to_nz(nd[a, b]))
    assert torch.equal(nz_to_nd(nz, 20, 40), nd)


def test_non_contiguous_input() -> None:
    base = _random((40, 17), torch.bfloat16)
    nd = base.t()  # (17, 40) transposed view
    assert torch.equal(nz_to_nd(nd_to_nz(nd), 17, 40), nd)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="nd_to_nz"):
        nd_to_nz(torch.zeros(5))
    nz = nd_to_nz(torch.zeros(17, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="storage"):
        nz_to_nd(nz, 33, 5)  # needs 3 k-fractals
    with pytest.raises(ValueError, match="storage"):
        nz_to_nd(nz.to(torch.int8), 17, 5)  # int8 needs C0 = 32


# --- format_cast / get_format, portable backend ------------------------------------------


def test_portable_format_tag() -> None:
    w = _random((64, 32), torch.int8)
    assert get_format(w) == FORMAT_ND
    w_nz = format_cast(w, FORMAT_NZ)
    assert get_format(w_nz) == FORMAT_NZ
    assert get_format(w) == FORMAT_ND  # the input is not modified
    assert w_nz is not w and w_nz.shape == w.shape and w_nz.data_ptr() == w.data_ptr()
    assert torch.equal(w_nz, w)
    assert get_format(format_cast(w_nz, FORMAT_ND)) == FORMAT_ND
    # Derived tensors are fresh (ND), like newly computed tensors on the device.
    assert get_format(w_nz.contiguous().clone()) == FORMAT_ND
    # The math does not see the format.
    x = _random((3, 64), torch.float32)
    assert torch.equal(x @ w_nz.float(), x @ w.float())


def test_portable_format_cast_parameter_keeps_attributes() -> None:
    p = torch.nn.Parameter(torch.zeros(16, 8), requires_grad=False)
    p.weight_loader = "loader"  # type: ignore[attr-defined]
    q = format_cast(p, FORMAT_NZ)
    assert isinstance(q, torch.nn.Parameter) and not q.requires_grad
    assert q.weight_loader == "loader"  # type: ignore[attr-defined]
    assert get_format(q) == FORMAT_NZ and get_format(p) == FORMAT_ND
    assert q.data_ptr() == p.data_ptr()


@pytest.mark.parametrize("fmt", [0, 3, 28, 30, -1, True, 29.0, "29"])
def test_unknown_format_rejected(fmt: object) -> None:
    with pytest.raises(ValueError, match="unknown format id"):
        format_cast(torch.zeros(2, 2), fmt)  # type: ignore[arg-type]


# --- format_cast / get_format, Ascend backend (minimal stand-in module) -------------------


def test_ascend_calls_torch_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []

    def npu_format_cast(t: torch.Tensor, fmt: int) -> torch.Tensor:
        calls.append(("npu_format_cast", fmt))
        return t.clone()

    def get_npu_format(t: torch.Tensor) -> int:
        calls.append(("get_npu_format", None))
        return 29

    fake = types.ModuleType("torch_npu")
    fake.npu_format_cast = npu_format_cast  # type: ignore[attr-defined]
    fake.get_npu_format = get_npu_format  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    w = torch.zeros(4, 4, dtype=torch.int8)
    with backend.use_backend("ascend"):
        out = format_cast(w, FORMAT_NZ)
        assert get_format(out) == FORMAT_NZ
        with pytest.raises(ValueError, match="unknown format id"):
            format_cast(w, 3)
    assert calls == [("npu_format_cast", 29), ("get_npu_format", None)]
    assert not hasattr(out, "_ascend_format")
