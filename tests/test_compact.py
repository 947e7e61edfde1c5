"""The C++ `compact` op against index_select: random shapes and dims, empty and repeated indices,
every dtype, non-contiguous inputs, the fake kernel, and clear errors for bad input. The CUDA
kernel (csrc/cuda/compact.cu) runs the same cases against the CPU op whenever a GPU is there."""

import pytest
import torch

from torchprune.ops import compact


def reference(tensors, dims, indices):
    return [t.index_select(d, i) for t, d, i in zip(tensors, dims, indices)]


@pytest.mark.parametrize("seed", range(5))
def test_matches_index_select_on_random_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    tensors, dims, indices = [], [], []
    for _ in range(6):
        ndim = int(torch.randint(1, 5, (1,), generator=g))
        shape = torch.randint(1, 6, (ndim,), generator=g).tolist()
        t = torch.randn(shape, generator=g)
        d = int(torch.randint(-ndim, ndim, (1,), generator=g))
        n = int(torch.randint(0, 2 * shape[d], (1,), generator=g))
        tensors.append(t)
        dims.append(d)
        indices.append(torch.randint(0, shape[d], (n,), generator=g))  # any order, repeats allowed
    for got, want in zip(compact(tensors, dims, indices), reference(tensors, dims, indices)):
        assert got.is_contiguous() and got.dtype == want.dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.bool])
def test_dtypes(dtype):
    t = (torch.randn(4, 6, 3) * 10).to(dtype)
    idx = torch.tensor([5, 0, 2])
    assert torch.equal(compact([t], [1], [idx])[0], t.index_select(1, idx))


def test_non_contiguous_and_empty():
    base = torch.randn(5, 7, 4)
    t = base.transpose(0, 2)[:, ::2]  # non-contiguous view
    idx = torch.tensor([3, 1])
    assert torch.equal(compact([t], [1], [idx])[0], t.index_select(1, idx))
    empty = compact([base], [0], [torch.empty(0, dtype=torch.int64)])[0]
    assert empty.shape == (0, 7, 4)
    assert compact([], [], []) == []


def test_fake_kernel_gives_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(8, 4)
        out = torch.ops.torchprune.compact([w, w], [0, -1],
                                           [torch.empty(3, dtype=torch.int64), torch.empty(2, dtype=torch.int64)])
    assert [tuple(o.shape) for o in out] == [(3, 4), (8, 2)]


def test_opcheck():
    w = torch.randn(6, 5)
    torch.library.opcheck(torch.ops.torchprune.compact, ([w, w], [0, 1], [torch.tensor([1, 4]), torch.tensor([0])]))


@pytest.mark.parametrize(
    "tensors,dims,indices,message",
    [
        ([torch.randn(4)], [0], [torch.tensor([4])], r"indices\[0\]` must lie in \[0, 4\), got 4"),
        ([torch.randn(4)], [0], [torch.tensor([-1])], r"must lie in \[0, 4\)"),
        ([torch.randn(4, 2)], [2], [torch.tensor([0])], r"dims\[0\]` must be in \[-2, 1\]"),
        ([torch.randn(4)], [0], [torch.tensor([0], dtype=torch.int32)], r"must have dtype torch.int64"),
        ([torch.randn(4)], [0], [torch.tensor([[0]])], r"indices\[0\]` must be 1-D"),
        ([torch.tensor(1.0)], [0], [torch.tensor([0])], r"at least 1 dimension"),
    ],
)
def test_bad_input_is_named(tensors, dims, indices, message):
    with pytest.raises(RuntimeError, match=message):
        compact(tensors, dims, indices)


def test_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        compact([torch.randn(2)], [0, 0], [torch.tensor([0])])



# ---------------------------------------------------------------------------------------------
# CUDA (csrc/cuda/compact.cu) against the CPU op. The "cuda" parameter is skipped, with the reason,
# where torch sees no GPU.

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"))


def assert_device_matches_cpu(tensors, dims, indices, device, indices_on_device=False):
    want = compact(tensors, dims, indices)
    moved = [t.to(device) for t in tensors]
    idx = [i.to(device) for i in indices] if indices_on_device else indices
    got = compact(moved, dims, idx)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.device.type == device and g.is_contiguous() and g.dtype == w.dtype
        assert g.shape == w.shape and torch.equal(g.cpu(), w)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("indices_on_device", [False, True], ids=["cpu_indices", "device_indices"])
@pytest.mark.parametrize("seed", range(5))
def test_device_matches_cpu_on_random_shapes(device, indices_on_device, seed):
    g = torch.Generator().manual_seed(seed)
    tensors, dims, indices = [], [], []
    for _ in range(12):  # one launch over all of them, empty outputs among them
        ndim = int(torch.randint(1, 5, (1,), generator=g))
        shape = torch.randint(1, 9, (ndim,), generator=g).tolist()
        d = int(torch.randint(-ndim, ndim, (1,), generator=g))
        n = int(torch.randint(0, 2 * shape[d], (1,), generator=g))
        tensors.append(torch.randn(shape, generator=g))
        dims.append(d)
        indices.append(torch.randint(0, shape[d], (n,), generator=g))
    assert_device_matches_cpu(tensors, dims, indices, device, indices_on_device)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                   torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_device_dtypes_and_copy_widths(device, dtype):
    """Every dtype, with rows of 1 byte up to many 16-byte words (the kernel copies the widest
    word that the row length and alignment allow), including a view whose data starts at an odd
    element (narrower words)."""
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(3, 40, 33, generator=g) * 10).to(dtype)
    cases = [
        (big, 1, torch.randint(0, 40, (25,), generator=g)),  # rows of 33 elements
        (big, 2, torch.randint(0, 33, (7,), generator=g)),  # rows of 1 element
        (big, 0, torch.tensor([2, 0])),  # rows of 40 * 33 elements
        (big.flatten()[1:1 + 64 * 16].view(64, 16), 0, torch.randint(0, 64, (30,), generator=g)),
        (big.transpose(0, 2), 1, torch.tensor([39, 0, 5])),  # non-contiguous input
    ]
    tensors, dims, indices = zip(*cases)
    assert_device_matches_cpu(list(tensors), list(dims), list(indices), device)


@pytest.mark.parametrize("device", [CUDA])
def test_device_large_entry(device):
    """A tensor of many blocks next to tiny ones: each block finds its own entry."""
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(5, generator=g), torch.randn(2048, 300, generator=g), torch.randn(3, 2, generator=g)]
    indices = [torch.tensor([4, 4, 0]), torch.randperm(2048, generator=g)[:1500], torch.tensor([1])]
    assert_device_matches_cpu(tensors, [0, 0, 1], indices, device)


@pytest.mark.parametrize("device", [CUDA])
def test_device_opcheck_and_errors(device):
    w = torch.randn(6, 5, device=device)
    torch.library.opcheck(torch.ops.torchprune.compact, ([w, w], [0, 1], [torch.tensor([1, 4]), torch.tensor([0])]))
    with pytest.raises(RuntimeError, match=r"indices\[0\]` must lie in \[0, 6\), got 6"):
        compact([w], [0], [torch.tensor([6], device=device)])
    with pytest.raises(RuntimeError, match=r"tensors\[1\]` must be on the same device as `tensors\[0\]`"):
        compact([w, torch.randn(3)], [0, 0], [torch.tensor([0]), torch.tensor([0])])
    with pytest.raises(RuntimeError, match=r"indices\[0\]` must be on the CPU when `tensors\[0\]` is"):
        compact([torch.randn(3)], [0], [torch.tensor([0], device=device)])
