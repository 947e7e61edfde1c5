"""pack_csr / unpack_csr / check_csr (csrc/cpu/pack.cpp, csrc/cuda/pack.cu): the packed format
round-trips exactly. Tests that take a `device` also run on CUDA whenever torch sees a GPU, where
the packed tensors must equal the CPU's byte for byte."""

import pytest
import torch

from torchprune import ops as _ops

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"))
DEVICES = ["cpu", CUDA]

SHAPES = [(1, 1), (3, 5), (17, 64), (64, 3), (0, 4), (4, 0), (2, 70000)]


def columns(col_idx):
    """The column of each stored entry, whichever index dtype holds it."""
    return col_idx.to(torch.int64) & 0xFFFF if col_idx.dtype == torch.int16 else col_idx.long()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_exact(shape, density, dtype, device):
    g = torch.Generator().manual_seed(hash((shape, density)) % 2**31)
    w = torch.randn(shape, generator=g).to(dtype)
    w[torch.rand(shape, generator=g) >= density] = 0
    w = w.to(device)
    row_ptr, col_idx, values = _ops.pack_csr(w)
    assert row_ptr.dtype == torch.int32 and row_ptr.shape == (shape[0] + 1,)
    assert col_idx.dtype == (torch.int16 if shape[1] < 65536 else torch.int32)
    assert values.dtype == dtype and values.numel() == int((w != 0).sum())
    assert all(t.device == w.device for t in (row_ptr, col_idx, values))
    assert torch.equal(_ops.unpack_csr(row_ptr, col_idx, values, shape[1]), w)
    _ops.check_csr(row_ptr, col_idx, values, shape[1])
    if device != "cpu":
        for a, b in zip((row_ptr, col_idx, values), _ops.pack_csr(w.cpu())):
            assert torch.equal(a.cpu(), b)


def test_layout_is_row_major_with_ascending_columns():
    w = torch.tensor([[0.0, 2.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 6.0, 0.0]])
    row_ptr, col_idx, values = _ops.pack_csr(w)
    assert row_ptr.tolist() == [0, 2, 2, 4]
    assert col_idx.tolist() == [1, 3, 0, 2]
    assert values.tolist() == [2.0, 4.0, 5.0, 6.0]


@pytest.mark.parametrize("device", DEVICES)
def test_columns_above_32767_survive_the_int16_storage(device):
    w = torch.zeros(2, 65535, device=device)
    w[0, 65534] = 1.0
    w[1, 40000] = 2.0
    row_ptr, col_idx, values = _ops.pack_csr(w)
    assert col_idx.dtype == torch.int16
    assert columns(col_idx).tolist() == [65534, 40000]
    assert torch.equal(_ops.unpack_csr(row_ptr, col_idx, values, 65535), w)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_keeps_allowed_zeros_and_drops_the_rest(device):
    w = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 4.0]], device=device)
    mask = torch.tensor([[True, False, True], [False, True, True]], device=device)
    row_ptr, col_idx, values = _ops.pack_csr(w, mask)
    assert row_ptr.tolist() == [0, 2, 4]
    assert columns(col_idx).tolist() == [0, 2, 1, 2]
    assert values.tolist() == [0.0, 2.0, 0.0, 4.0]
    assert torch.equal(_ops.unpack_csr(row_ptr, col_idx, values, 3), w * mask)


@pytest.mark.parametrize("device", DEVICES)
def test_packing_is_deterministic_and_ignores_strides(device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)
    w[w.abs() < 1] = 0
    w = w.to(device)
    a = _ops.pack_csr(w)
    b = _ops.pack_csr(w.t().contiguous().t())  # same values, transposed strides
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_pack_errors(device):
    ones = lambda *shape, **kw: torch.ones(*shape, device=device, **kw)  # noqa: E731
    with pytest.raises(RuntimeError, match="pack_csr: `weight` must be 2-D"):
        _ops.pack_csr(ones(2, 3, 4))
    with pytest.raises(RuntimeError, match="pack_csr: `weight` must be a floating point"):
        _ops.pack_csr(ones(2, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="pack_csr: `mask` must have the same shape"):
        _ops.pack_csr(ones(2, 3), ones(3, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="pack_csr: `mask` must be a bool tensor"):
        _ops.pack_csr(ones(2, 3), ones(2, 3))


def packed(w):
    return [t.clone() for t in _ops.pack_csr(w)]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda r, c, v: (r.to(torch.int64), c, v), "`row_ptr` must have dtype torch.int32"),
        (lambda r, c, v: (r, c.to(torch.int32), v), "`col_idx` must have dtype torch.int16"),
        (lambda r, c, v: (r, c, v[:-1]), "one entry per stored value"),
        (lambda r, c, v: (r[:0], c, v), "`row_ptr` must have out_features \\+ 1 >= 1"),
        (lambda r, c, v: (r.index_fill(0, torch.tensor([0]), 1), c, v), "must start at 0"),
        (lambda r, c, v: (r, c.flip(0), v), "`col_idx` must ascend within each row"),
        # an interior row pointer past nnz: the walk must refuse it without reading past col_idx
        (lambda r, c, v: (r.index_fill(0, torch.tensor([1]), 5), c, v), "nor exceed the number of stored"),
        (lambda r, c, v: (r, c.index_fill(0, torch.tensor([1]), 9), v), "must lie in \\[0, in_features\\)"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_corrupted_packs_are_refused(corrupt, message, device):
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]])
    row_ptr, col_idx, values = (t.to(device) for t in corrupt(*packed(w)))
    with pytest.raises(RuntimeError, match=message):
        _ops.check_csr(row_ptr, col_idx, values, 4)
    with pytest.raises(RuntimeError, match=message):
        _ops.unpack_csr(row_ptr, col_idx, values, 4)
