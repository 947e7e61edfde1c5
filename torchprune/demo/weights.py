"""The demo's weight-level runs: individual weights masked to 50, 80, 90 and 95% global sparsity.

For each architecture (`sweep`), the trained dense model is pruned by global magnitude

* one-shot (``tp.prune``), measured before and after fine-tuning, and
* progressively while it trains (``tp.Pruner`` with the Zhu & Gupta cubic schedule), given the same
  number of epochs as the fine-tuning;

and the dense MLP is also pruned once by Wanda to 95% (`wanda`), to contrast which input pixels each
method keeps reading.
"""

from __future__ import annotations

import copy
from typing import Sequence, Tuple

import torch
from torch import nn

from ..oneshot import prune
from ..pruner import Pruner
from .common import LR, Split, Sweep, Wanda, accuracy, make_cnn, make_mlp, progressive_schedule, train

__all__ = ["sweep", "wanda"]


def sweep(kind: str, data: Split, epochs: Tuple[int, int], seed: int, sparsities: Sequence[float], bar) -> Sweep:
    """Dense training of ``kind`` ("mlp" or "cnn"), then both methods at each sparsity; ``bar.update(1)``
    after the dense model and after each method."""
    x_train, y_train, x_test, y_test = data
    dense_epochs, budget = epochs
    torch.manual_seed(seed)
    dense = make_mlp() if kind == "mlp" else make_cnn()
    train(dense, x_train, y_train, dense_epochs, LR, seed, f"{kind}: dense")
    result = Sweep(dense=accuracy(dense, x_test, y_test), models={"dense": dense})
    bar.update(1)
    for target in sparsities:
        oneshot = prune(copy.deepcopy(dense), sparsity=target, scope="global", importance="magnitude")
        result.accuracy["one-shot"][target] = accuracy(oneshot, x_test, y_test)
        train(oneshot, x_train, y_train, budget, LR, seed + 1, f"{kind}: fine-tune {target:.0%}")
        result.accuracy["one-shot + fine-tune"][target] = accuracy(oneshot, x_test, y_test)
        bar.update(1)

        model = copy.deepcopy(dense)
        schedule = progressive_schedule(x_train, budget, target)
        pruner = Pruner(model, target, schedule, importance="magnitude", scope="global")
        train(model, x_train, y_train, budget, LR, seed + 1, f"{kind}: progressive {target:.0%}", pruner)
        result.accuracy["progressive"][target] = accuracy(model, x_test, y_test)
        result.models[("one-shot + fine-tune", target)] = oneshot
        result.models[("progressive", target)] = model
        result.schedules[target] = schedule
        bar.update(1)
    return result


def wanda(dense: nn.Module, flat: Split, budget: int, seed: int) -> Wanda:
    """A copy of the dense MLP pruned once by Wanda to 95% (the training images as calibration data),
    then fine-tuned for ``budget`` epochs like one-shot magnitude."""
    x_train, y_train, x_test, y_test = flat
    # Wanda weighs |w| by the input's norm: weights on pixels that are always blank score 0
    model = prune(copy.deepcopy(dense), sparsity=0.95, importance="wanda", data=[x_train])
    before = accuracy(model, x_test, y_test)
    train(model, x_train, y_train, budget, LR, seed + 1, "mlp: fine-tune Wanda 95%")
    return Wanda(before=before, after=accuracy(model, x_test, y_test), model=model)
