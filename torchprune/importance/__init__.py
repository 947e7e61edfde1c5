"""Importance criteria: one score per weight, higher means more worth keeping.

Every criterion returns a tensor of the weight's shape, so one selection routine serves all of
them. Criteria know nothing about schedules or granularity. Data-driven criteria (``Gradient``,
``Taylor``) accumulate statistics from backward passes through `observe()`; forward criteria
(``Activation``, ``Wanda``) accumulate statistics of each layer's inputs or outputs through
`observe_forward()`. `prune()` feeds them the batches given as ``data``, and the progressive Pruner
can feed them its training steps. Criteria with a structured form also score channel groups
(``channel_scores``, see `base.py`). ``SparseGPT`` also reconstructs: it returns the new weights
with the mask (``reconstruct()``), and the entry points use that instead of its scores.

* base.py: the `Importance` contract, `Requires`, `ChannelTensor`, shared helpers;
* weights.py: `Magnitude`, `FilterNorm`, `Random`; gradients.py: `Gradient`, `Taylor`;
* activations.py: `Activation` (mean / APoZ), `Entropy`, `Wanda`; batchnorm.py: `BNScale`;
* sparsegpt.py: `SparseGPT` (prunes and reconstructs the kept weights from the layer's inputs).

>>> crit = tp.importance.Taylor()
>>> tp.prune(model, sparsity=0.5, importance=crit, data=batches, loss_fn=F.cross_entropy)
"""

from __future__ import annotations

from typing import Union

from .activations import Activation, Entropy, Wanda
from .base import Importance
from .batchnorm import BNScale
from .gradients import Gradient, Taylor
from .sparsegpt import SparseGPT
from .weights import FilterNorm, Magnitude, Random

__all__ = [
    "Importance",
    "Magnitude",
    "FilterNorm",
    "Gradient",
    "Taylor",
    "Random",
    "Activation",
    "Wanda",
    "Entropy",
    "BNScale",
    "SparseGPT",
    "NAMES",
    "resolve",
]

#: Names accepted wherever an importance is asked for, and what they build.
NAMES = {
    "magnitude": lambda: Magnitude(p=1),
    "l1": lambda: Magnitude(p=1),
    "l2": lambda: Magnitude(p=2),
    "filter_norm": lambda: FilterNorm(p=2),
    "gradient": Gradient,
    "taylor": Taylor,
    "random": lambda: Random(seed=0),
    "activation": lambda: Activation(kind="mean"),
    "apoz": lambda: Activation(kind="apoz"),
    "entropy": Entropy,
    "wanda": Wanda,
    "bn_scale": BNScale,
    "sparsegpt": SparseGPT,
}


def resolve(importance: Union[str, Importance]) -> Importance:
    """An Importance instance from an instance or one of the names in `NAMES`."""
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str):
        key = importance.lower()
        if key not in NAMES:
            raise ValueError(f"`importance` must be one of {sorted(NAMES)} or an Importance, got {importance!r}")
        return NAMES[key]()
    raise TypeError(
        f"`importance` must be one of {sorted(NAMES)} or an Importance instance, got {type(importance).__name__}"
    )
