"""Importance criteria: one score per weight, higher means more worth keeping.

Every criterion returns a tensor of the weight's shape, so one selection routine serves all of
them. Criteria know nothing about schedules or granularity. Data-driven criteria (``Gradient``,
``Taylor``) accumulate statistics from backward passes through `observe()`; forward criteria
(``Activation``, ``Wanda``) accumulate statistics of each layer's inputs or outputs through
`observe_forward()`. `prune()` feeds them the batches given as ``data``, and the progressive Pruner
can feed them its training steps.

>>> crit = tp.importance.Taylor()
>>> tp.prune(model, sparsity=0.5, importance=crit, data=batches, loss_fn=F.cross_entropy)
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
from torch import nn

from .masking import effective_weight, get_mask

__all__ = [
    "Importance",
    "Magnitude",
    "FilterNorm",
    "Gradient",
    "Taylor",
    "Random",
    "Activation",
    "Wanda",
    "BNScale",
    "NAMES",
    "resolve",
]


class Importance:
    """Base class: ``score(module)`` returns a float tensor shaped like ``module.weight``."""

    #: True when the criterion needs calibration data (`prune()` then requires ``data``).
    requires_data: bool = False
    #: True when it needs backward passes too (`prune()` then also requires ``loss_fn``).
    requires_loss: bool = False

    def score(self, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score(module)")

    def reset(self) -> None:
        """Forgets any state, so that a new pruning round scores from scratch (stateless: no-op)."""

    def observed(self, module: nn.Module) -> bool:
        """Whether the criterion has what it needs to score ``module`` (always, unless data-driven)."""
        return True

    def prepare(self, model: nn.Module, layers: Dict[str, nn.Module]) -> None:
        """Called once with the whole model before a round of scoring (no-op unless a criterion
        needs to look beyond the layer, as `BNScale` does)."""

    def state_dict(self, layers: Dict[str, nn.Module]) -> Dict[str, object]:
        """The accumulated state by layer name, so that a Pruner can resume (stateless: empty)."""
        return {}

    def load_state_dict(self, state: Dict[str, object], layers: Dict[str, nn.Module]) -> None:
        """Restores what `state_dict` returned, for the layers of the same names."""

    def __call__(self, module: nn.Module) -> torch.Tensor:
        return self.score(module)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _score_precision(weight: torch.Tensor) -> torch.Tensor:
    """Half-precision weights are scored in float32, so that |w|^2 of small weights cannot
    underflow to ties."""
    return weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight


def _abs_weight(module: nn.Module, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
    """|effective weight| of output rows ``start:stop`` in a new tensor in the scoring precision,
    with one temporary at most (the masked copy, made absolute in place)."""
    weight, mask = module.weight.detach()[start:stop], get_mask(module)
    if mask is not None:
        weight = torch.where(mask[start:stop], weight, torch.zeros((), dtype=weight.dtype))
    if weight.dtype in (torch.float16, torch.bfloat16):
        return weight.float().abs_()
    return weight.abs_() if mask is not None else weight.abs()  # masked: already a copy


def _check_p(p) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or p <= 0:
        raise ValueError(f"`p` must be a positive number, got {p!r}")
    return p


class Magnitude(Importance):
    """|w|^p of each weight (p=1: L1 magnitude pruning; p=2 ranks the same way, squared)."""

    def __init__(self, p: float = 1):
        self.p = _check_p(p)

    def score(self, module: nn.Module) -> torch.Tensor:
        return self.score_rows(module, 0, None)

    def score_rows(self, module: nn.Module, start: int, stop: Optional[int]) -> torch.Tensor:
        """The scores of output rows ``start:stop`` alone: a global ranking computes them block by
        block instead of holding every layer's scores (see `selection.RowScores`)."""
        scores = _abs_weight(module, start, stop)
        return scores if self.p == 1 else scores.pow_(self.p)


class FilterNorm(Importance):
    """The Lp norm of each output filter (conv) or neuron (linear row), given to all its weights.

    With weight granularity this masks whole filters, lowest norm first (Li et al. 2017).
    """

    def __init__(self, p: float = 2):
        self.p = _check_p(p)

    def score(self, module: nn.Module) -> torch.Tensor:
        weight = _score_precision(effective_weight(module))
        norms = weight.flatten(1).norm(p=self.p, dim=1)
        return norms.view(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()


class _Accumulated(Importance):
    """A criterion summed over backward passes; `observe()` after each backward, `reset()` to clear."""

    requires_data = True
    requires_loss = True

    def __init__(self):
        self._sums: Dict[int, torch.Tensor] = {}

    def _term(self, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, module: nn.Module) -> None:
        """Adds this backward pass's term for ``module`` (skipped if it has no gradient)."""
        if module.weight.grad is None:
            return
        term = self._term(module).detach()
        key = id(module)
        self._sums[key] = term.clone() if key not in self._sums else self._sums[key].add_(term)

    def reset(self) -> None:
        self._sums.clear()

    def observed(self, module: nn.Module) -> bool:
        return id(module) in self._sums

    def state_dict(self, layers: Dict[str, nn.Module]) -> Dict[str, object]:
        return {name: self._sums[id(m)].clone() for name, m in layers.items() if id(m) in self._sums}

    def load_state_dict(self, state: Dict[str, object], layers: Dict[str, nn.Module]) -> None:
        self._sums = {id(layers[name]): value.clone() for name, value in state.items()}

    def score(self, module: nn.Module) -> torch.Tensor:
        total = self._sums.get(id(module))
        if total is None:
            raise RuntimeError(
                f"{type(self).__name__} has no gradient statistics for this {type(module).__name__}; "
                "pass `data` and `loss_fn` to prune() (or call observe() after backward passes)"
            )
        return total


class Gradient(_Accumulated):
    """Sum over batches of |dL/dw|: how strongly the loss reacts to each weight."""

    def _term(self, module: nn.Module) -> torch.Tensor:
        return _score_precision(module.weight.grad).abs()  # half-precision grads summed in float32


class Taylor(_Accumulated):
    """Sum over batches of |w * dL/dw|: the first-order Taylor estimate of the loss change when the
    weight is removed (Molchanov et al. 2017/2019), taken per weight and per batch."""

    def _term(self, module: nn.Module) -> torch.Tensor:
        weight = _score_precision(effective_weight(module))
        return (weight * _score_precision(module.weight.grad)).abs_()  # half precision: in float32


class Random(Importance):
    """Uniform random scores from a seeded generator: the baseline every criterion must beat.

    Scores are reproducible: a layer's scores depend only on the seed and the layer's position in
    the scoring order, which `prune()` keeps fixed (module order).
    """

    def __init__(self, seed: int = 0):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__}")
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        """Restarts the random stream from the seed."""
        self._generator.manual_seed(self.seed)

    def state_dict(self, layers: Dict[str, nn.Module]) -> Dict[str, object]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: Dict[str, object], layers: Dict[str, nn.Module]) -> None:
        self._generator.set_state(state["generator"])

    def score(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        scores = torch.rand(weight.shape, generator=self._generator, dtype=torch.float64)
        return scores.to(device=weight.device)


from .activations import Activation, BNScale, Wanda  # noqa: E402  (they subclass Importance)

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
    "wanda": Wanda,
    "bn_scale": BNScale,
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
