"""The C++ `compact` op against index_select: random shapes and dims, empty and repeated indices,
every dtype, non-contiguous inputs, the fake kernel, and clear errors for bad input."""

import pytest
import torch

from torchprune._ops import compact


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
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
        out = torch.ops.torchprune.compact([w, w], [0, -1], [torch.empty(3, dtype=torch.int64), torch.empty(2, dtype=torch.int64)])
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
