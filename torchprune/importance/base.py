"""The `Importance` contract shared by every criterion, and the helpers criteria build on.

A criterion scores at two granularities:

* weights: ``score(module)`` returns one score per weight, a tensor shaped like ``module.weight``;
* channels: ``channel_scores(member)`` returns one score per index along a group member's dims
  (see `ChannelTensor`); `torchprune.structured.scoring` aggregates them over a group. A criterion
  without this hook has no structured form and is refused for channel pruning.

``requires`` says what a criterion reads (`Requires`): the weights alone, forward passes on data,
or backward passes of a loss; the entry points ask for ``data`` / ``loss_fn`` accordingly and
`torchprune.calibration` runs the passes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "Importance", "Requires", "ChannelTensor", "score_precision", "per_output",
    "has_channel_form", "check_channel_form",
]


class Requires(str, enum.Enum):
    """What a criterion reads to score."""

    WEIGHTS = "weights"  #: the weights (and other parameters) alone
    DATA = "data"  #: forward passes on calibration data
    LOSS = "loss"  #: backward passes of a loss on calibration data


@dataclass
class ChannelTensor:
    """One tensor of the channel groups being scored, as a criterion's `channel_scores` sees it.

    ``value`` is the tensor (detached); ``dims`` the dims along which the groups remove indices;
    ``output_dim`` the dim of its module's output that carries the indices of dim 0 when the tensor
    produces them (a Linear/conv weight, a norm's scale), else None; ``norm_scale`` is True for the
    scale (gamma) of a BatchNorm/InstanceNorm/LayerNorm; ``gathered`` is what the data passes
    collected for it (None for weight-only criteria, or when the passes had nothing for it);
    ``weight`` is True when the weight criteria (magnitude, filter norm, gradient, Taylor) score it:
    what the layer-type table says for a known layer type, any tensor of 2 or more dims otherwise.
    """

    value: torch.Tensor
    dims: Tuple[int, ...]
    output_dim: Optional[int] = None
    norm_scale: bool = False
    gathered: Union[None, torch.Tensor, Dict[str, torch.Tensor]] = None
    weight: bool = False


_STRUCTURED_NAMES = "'l1', 'l2', 'filter_norm', 'taylor', 'gradient', 'bn_scale', 'activation', 'apoz', 'random'"


class Importance:
    """Base class: ``score(module)`` returns a float tensor shaped like ``module.weight``."""

    #: True when the criterion needs calibration data (`prune()` then requires ``data``).
    requires_data: bool = False
    #: True when it needs backward passes too (`prune()` then also requires ``loss_fn``).
    requires_loss: bool = False
    #: The criterion that scores a channel group none of whose members this one can score (None:
    #: such a group scores 0).
    channel_fallback: Optional["Importance"] = None

    @property
    def requires(self) -> Requires:
        """What the criterion reads: `Requires.WEIGHTS`, `Requires.DATA` or `Requires.LOSS`."""
        if self.requires_loss:
            return Requires.LOSS
        return Requires.DATA if self.requires_data else Requires.WEIGHTS

    def score(self, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score(module)")

    def channel_scores(self, member: ChannelTensor) -> Optional[Dict[int, torch.Tensor]]:
        """One float64 score per index along each dim of ``member.dims`` (higher = keep), or None
        when this criterion does not score that member. Only criteria with a structured form
        implement it."""
        raise _no_channel_form(self)

    def unit_scores(self, sizes: Sequence[int]) -> Optional[list]:
        """Scores decided per unit without reading any member (one float64 vector per size), or
        None to score the members with `channel_scores` (every criterion but `Random`)."""
        return None

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


def has_channel_form(criterion: Importance) -> bool:
    """Whether ``criterion`` scores channel groups (it overrides `channel_scores` or `unit_scores`)."""
    cls = type(criterion)
    return cls.channel_scores is not Importance.channel_scores or cls.unit_scores is not Importance.unit_scores


def check_channel_form(criterion: Importance) -> None:
    """Raises ValueError, naming the criteria that have one, for a criterion without a structured form."""
    if not has_channel_form(criterion):
        raise _no_channel_form(criterion)


def _no_channel_form(criterion: Importance) -> ValueError:
    return ValueError(f"`importance` {criterion!r} has no structured form; use one of {_STRUCTURED_NAMES}")


def score_precision(weight: torch.Tensor) -> torch.Tensor:
    """Half-precision weights are scored in float32, so that |w|^2 of small weights cannot
    underflow to ties."""
    return weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight


def per_output(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One value per output neuron / filter (``values``, one per row of ``weight``) given to every
    weight of that row, in a new tensor."""
    return values.view(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).clone()
