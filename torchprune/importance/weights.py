"""Criteria that read the weights alone: `Magnitude`, `FilterNorm` and the `Random` baseline."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..masking import effective_weight, get_mask
from .base import ChannelTensor, Importance, per_output, score_precision

__all__ = ["Magnitude", "FilterNorm", "Random"]


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


def _powered_sums(member: ChannelTensor, p: float) -> Optional[Dict[int, torch.Tensor]]:
    """Sum of |x|^p over each index's slice, along each of the member's dims, for tensors of 2 or
    more dims (weights of conv, linear, embedding, LSTM inputs; not biases or norm scales).

    One float64 copy (never the tensor itself), powered in place and shared by the dims, so that
    scoring holds one float64 weight at a time rather than a float64 copy of the model."""
    value = member.value
    if not member.weight:
        return None
    powered = value.to(dtype=torch.float64, copy=True)
    powered = powered.square_() if p == 2 else powered.abs_() if p == 1 else powered.abs_().pow_(p)
    return {dim: powered.sum([d for d in range(powered.dim()) if d != dim]) for dim in member.dims}


class Magnitude(Importance):
    """|w|^p of each weight (p=1: L1 magnitude pruning; p=2 ranks the same way, squared).

    Channels: the sum of |w|^p over each channel's slice of every weight of the group."""

    def __init__(self, p: float = 1):
        self.p = _check_p(p)

    def score(self, module: nn.Module) -> torch.Tensor:
        return self.score_rows(module, 0, None)

    def score_rows(self, module: nn.Module, start: int, stop: Optional[int]) -> torch.Tensor:
        """The scores of output rows ``start:stop`` alone: a global ranking computes them block by
        block instead of holding every layer's scores (see `selection.RowScores`)."""
        scores = _abs_weight(module, start, stop)
        return scores if self.p == 1 else scores.pow_(self.p)

    def channel_scores(self, member: ChannelTensor) -> Optional[Dict[int, torch.Tensor]]:
        return _powered_sums(member, float(self.p))


class FilterNorm(Importance):
    """The Lp norm of each output filter (conv) or neuron (linear row), given to all its weights.

    With weight granularity this masks whole filters, lowest norm first (Li et al. 2017). Channels:
    the Lp norm of each channel's slice of every weight of the group.
    """

    def __init__(self, p: float = 2):
        self.p = _check_p(p)

    def score(self, module: nn.Module) -> torch.Tensor:
        weight = score_precision(effective_weight(module))
        return per_output(weight.flatten(1).norm(p=self.p, dim=1), weight)

    def channel_scores(self, member: ChannelTensor) -> Optional[Dict[int, torch.Tensor]]:
        p = float(self.p)
        sums = _powered_sums(member, p)
        return None if sums is None else {dim: summed.pow(1 / p) for dim, summed in sums.items()}


class Random(Importance):
    """Uniform random scores from a seeded generator: the baseline every criterion must beat.

    Scores are reproducible: a layer's scores depend only on the seed and the layer's position in
    the scoring order, which `prune()` keeps fixed (module order). Channels and heads are scored
    per unit with `sample`, restarting from the seed each round.
    """

    def __init__(self, seed: int = 0):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__}")
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def sample(self, count: int) -> torch.Tensor:
        """The next ``count`` uniform float64 numbers of the seeded stream (on the CPU)."""
        return torch.rand(count, generator=self._generator, dtype=torch.float64)

    def unit_scores(self, sizes: Sequence[int]) -> list:
        """One uniform vector per size, from the seed: the same units get the same scores."""
        self.reset()
        return [self.sample(size) for size in sizes]

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
