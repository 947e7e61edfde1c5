"""tp.recalibrate_bn(): fresh BatchNorm statistics for a pruned model.

Pruning changes what each convolution puts out, but a BatchNorm layer keeps normalizing with the
running mean and variance it learned on the dense model: stale statistics that can cost a pruned
CNN more accuracy than the pruning itself. Recomputing them on a few batches of unlabeled inputs is
the cheapest recovery there is (no gradient, no optimizer).

The running statistics of every BatchNorm layer are reset and accumulated as an exact average over
the given batches (momentum None while it runs: each batch weighs the same, whatever the order),
with the rest of the model in eval mode (no dropout) and no gradient. Afterwards every module's
train/eval flag and every layer's momentum are what they were.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

import torch
from torch import nn

from ..calibration import batches as split_batches
from ..calibration import call
from ..state import preserved_state

__all__ = ["recalibrate_bn"]

_NORMS = (nn.modules.batchnorm._BatchNorm,)


def recalibrate_bn(model: nn.Module, data: Iterable, max_batches: Optional[int] = None) -> nn.Module:
    """Recomputes the running mean and variance of every BatchNorm layer of ``model`` over the input
    batches of ``data`` (at most ``max_batches`` of them); returns ``model``.

    ``data`` yields what `tp.prune`'s ``data`` does: tensors, tuples, dicts, `tp.Inputs`, or
    (inputs, targets) pairs (targets ignored). Layers built with ``track_running_stats=False`` keep
    no statistics and are left alone. ValueError when ``model`` has no BatchNorm layer that tracks
    statistics, or ``data`` is empty; on any error the statistics are put back as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"`max_batches` must be a positive int or None, got {max_batches!r}")
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        raise ValueError("`model` has no BatchNorm layer that tracks running statistics: nothing to recalibrate")
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.state_dict().items() if k.startswith("running_")
                              or k == "num_batches_tracked"}) for m in norms]
    seen = 0
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over the batches
                norm.train()
            for inputs, _ in split_batches(itertools.islice(data, max_batches), targets=False, model=model):
                call(model, inputs)
                seen += 1
        if seen == 0:
            raise ValueError("`data` yielded no batch: the BatchNorm statistics need at least one")
    except BaseException:
        for norm, _, state in saved:
            for key, value in state.items():
                getattr(norm, key).copy_(value)
        raise
    finally:
        for norm, momentum, _ in saved:
            norm.momentum = momentum
    return model
