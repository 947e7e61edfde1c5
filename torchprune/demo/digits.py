"""Real data for the demo and tests: scikit-learn's bundled 8x8 handwritten digits.

The 1,797 images ship inside scikit-learn, so the demo runs offline and in seconds while still
pruning a model trained on real data rather than noise.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["load_digits", "batches"]


def load_digits(test_fraction: float = 0.25, seed: int = 0,
                flatten: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)`` of the 8x8 digits, split by class.

    Images are float32 in [0, 1] (the raw pixels are 0..16), shaped (N, 64) or, with
    ``flatten=False``, (N, 1, 8, 8) for convolutions; labels are int64 in 0..9. The split is
    stratified (each class keeps its share in both parts) and depends only on ``seed``.

        x_train, y_train, x_test, y_test = load_digits()
        x_train.shape                  # torch.Size([1347, 64])
        model(x_test).argmax(1).eq(y_test).float().mean()
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}")
    try:
        from sklearn.datasets import load_digits as _sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError("torchprune.demo.digits.load_digits needs scikit-learn: "
                          "`pip install scikit-learn` (or the demo extra: "
                          "`pip install -e \".[demo]\"`)") from error

    digits = _sklearn_digits()
    x = torch.from_numpy(digits.data).to(torch.float32) / 16.0
    y = torch.from_numpy(digits.target).to(torch.int64)
    index = torch.arange(len(y)).numpy()
    train_index, test_index = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=digits.target)
    train_index, test_index = torch.from_numpy(train_index), torch.from_numpy(test_index)
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    return (x[train_index].contiguous(), y[train_index],
            x[test_index].contiguous(), y[test_index])


def batches(x: Tensor, y: Tensor, batch_size: int, shuffle: bool = False,
            generator: Optional[torch.Generator] = None,
            drop_last: bool = False) -> Iterator[Tuple[Tensor, Tensor]]:
    """Iterate over ``(x[i:i+batch_size], y[i:i+batch_size])`` pairs: one pass, one epoch.

    With ``shuffle=True`` the order is a fresh ``torch.randperm`` drawn from ``generator`` (pass a
    seeded ``torch.Generator`` for a repeatable order). ``drop_last`` skips a short final batch,
    which BatchNorm in training mode cannot always use. Arguments are checked immediately.

        g = torch.Generator().manual_seed(0)
        for inputs, targets in batches(x_train, y_train, 64, shuffle=True, generator=g):
            loss = loss_fn(model(inputs), targets)
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"`x` and `y` must be Tensors, got {type(x).__name__} "
                        f"and {type(y).__name__}")
    if len(x) != len(y):
        raise ValueError(f"`x` and `y` must have the same length, got {len(x)} and {len(y)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    return _batches(x, y, batch_size, shuffle, generator, drop_last)


def _batches(x: Tensor, y: Tensor, batch_size: int, shuffle: bool,
             generator: Optional[torch.Generator], drop_last: bool
             ) -> Iterator[Tuple[Tensor, Tensor]]:
    n = len(x)
    order = None
    if shuffle:  # drawn where the generator lives, then moved next to the data
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            index = order[start:start + batch_size]
            yield x[index.to(x.device)], y[index.to(y.device)]
