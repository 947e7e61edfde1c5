import builtins

import pytest
import torch

from torchprune.demo.digits import batches, load_digits

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_shapes_dtypes_and_range(digits):
    x_train, y_train, x_test, y_test = digits
    assert len(x_train) + len(x_test) == N_DIGITS
    assert abs(len(x_test) - 0.25 * N_DIGITS) <= 1
    assert x_train.shape[1:] == x_test.shape[1:] == (64,)
    assert len(y_train) == len(x_train) and len(y_test) == len(x_test)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    x = torch.cat([x_train, x_test])
    assert x.min() == 0.0 and x.max() == 1.0  # pixels 0..16 scaled by 1/16
    assert torch.equal(x * 16, (x * 16).round())
    assert set(torch.cat([y_train, y_test]).tolist()) == set(range(10))


def test_split_is_a_partition_of_the_dataset(digits):
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    x_train, y_train, x_test, y_test = digits
    ours = torch.cat([torch.cat([x_train, x_test]) * 16,
                      torch.cat([y_train, y_test])[:, None].float()], 1)
    theirs = torch.cat([torch.as_tensor(raw.data, dtype=torch.float32),
                        torch.as_tensor(raw.target, dtype=torch.float32)[:, None]], 1)
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, theirs.tolist()))


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_split_is_stratified(fraction):
    _, y_train, _, y_test = load_digits(test_fraction=fraction)
    for label in range(10):
        total = int((y_train == label).sum() + (y_test == label).sum())
        assert abs(int((y_test == label).sum()) - fraction * total) <= 1


def test_seed_determinism_and_unflattened_view(digits):
    again = load_digits(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(digits, again))
    other = load_digits(seed=1)
    assert not torch.equal(digits[1], other[1])
    images = load_digits(seed=0, flatten=False)
    assert images[0].shape == (len(digits[0]), 1, 8, 8)
    assert torch.equal(images[0].reshape(-1, 64), digits[0])
    assert torch.equal(images[3], digits[3])


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, "0.2"])
def test_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match="`test_fraction`"):
        load_digits(test_fraction=fraction)


def test_missing_sklearn_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()


def test_batches_in_order_and_drop_last():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    sizes = [len(xb) for xb, _ in batches(x, y, 4)]
    assert sizes == [4, 4, 2]
    assert torch.equal(torch.cat([yb for _, yb in batches(x, y, 4)]), y)
    assert [len(yb) for _, yb in batches(x, y, 4, drop_last=True)] == [4, 4]
    assert [len(yb) for _, yb in batches(x, y, 20)] == [10]


def test_batches_shuffle_is_a_seeded_permutation():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        pairs = list(batches(x, y, 3, shuffle=True, generator=g))
        assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in pairs)  # rows stay paired
        return torch.cat([yb for _, yb in pairs])

    assert torch.equal(order(0), order(0))
    assert sorted(order(0).tolist()) == list(range(10))
    assert not torch.equal(order(0), order(1)) or not torch.equal(order(0), y)


@pytest.mark.parametrize("kwargs, error", [
    (dict(batch_size=0), ValueError),
    (dict(batch_size=2.5), ValueError),
    (dict(batch_size=2, y=torch.arange(3)), ValueError),
    (dict(batch_size=2, x=[1, 2, 3, 4]), TypeError),
])
def test_batches_validates_eagerly(kwargs, error):
    args = dict(x=torch.zeros(4, 1), y=torch.arange(4))
    args.update(kwargs)
    with pytest.raises(error):
        batches(**args)  # raises before iteration starts
