"""Criteria that read what flows through the network rather than the weights alone.

* `Activation` ranks a layer's output neurons / filters by how they fire on real data: the mean
  activation or the Average Percentage of Zeros (APoZ, Hu et al. 2016).
* `Entropy` (Luo & Wu 2017) ranks them by the entropy of their pooled activation.
* `Wanda` (Sun et al. 2023) weighs each weight by the size of the input feature it multiplies.

Both accumulate statistics in forward hooks through `observe_forward()`: `prune()` runs the
``data`` batches through the model (see `calibration.observe_activations`), and the progressive
Pruner observes the training forward passes (or its own ``data``).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..masking import effective_weight
from .base import ChannelTensor, Importance, per_output, score_precision
from .weights import FilterNorm

__all__ = ["Activation", "Entropy", "Wanda"]


def _channel_dim(module: nn.Module, tensor: torch.Tensor) -> int:
    """Where the features are: the last dim for Linear, dim 1 (dim 0 unbatched) for convs."""
    if isinstance(module, nn.Linear):
        return tensor.dim() - 1
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    return 1 if tensor.dim() == spatial + 2 else 0


def _per_channel(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` as (channels, everything else), in float64."""
    channels = tensor.shape[dim]
    rest = tensor.numel() // channels if channels else 0  # explicit: -1 is ambiguous for 0 elements
    return tensor.detach().movedim(dim, 0).reshape(channels, rest).double()


class ForwardStatistic(Importance):
    """Per-layer sums kept in float64 and updated by `observe_forward(module, inputs, output)`.

    Public inside the package (not in ``__all__``): `sparsegpt.SparseGPT` keeps its Hessian sums the
    same way, so that resuming and the DDP averaging treat all forward criteria alike."""

    requires_data = True
    requires_loss = False

    def __init__(self):
        self._stats: Dict[int, Dict[str, torch.Tensor]] = {}

    def observe_forward(self, module: nn.Module, inputs, output) -> None:
        raise NotImplementedError

    def _add(self, module: nn.Module, **terms: torch.Tensor) -> None:
        stats = self._stats.setdefault(id(module), {})
        for key, value in terms.items():
            stats[key] = value.clone() if key not in stats else stats[key].add_(value)

    def reset(self) -> None:
        self._stats.clear()

    def observed(self, module: nn.Module) -> bool:
        return id(module) in self._stats

    def state_dict(self, layers: Dict[str, nn.Module]) -> Dict[str, object]:
        return {name: {k: v.clone() for k, v in self._stats[id(m)].items()}
                for name, m in layers.items() if id(m) in self._stats}

    def load_state_dict(self, state: Dict[str, object], layers: Dict[str, nn.Module]) -> None:
        self._stats = {id(layers[name]): {k: v.clone() for k, v in stats.items()} for name, stats in state.items()}

    def _stats_of(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        stats = self._stats.get(id(module))
        if stats is None:
            raise RuntimeError(
                f"{type(self).__name__} has no activation statistics for this {type(module).__name__}; pass "
                "`data` to prune() (or run forward passes with observe_forward() hooked in)"
            )
        return stats


class ChannelActivation(ForwardStatistic):
    """A criterion that sums per-channel statistics of a layer's output (``output_statistics``) and
    turns them into one score per channel (``per_channel``), given to the whole output row at weight
    level and read on every producer of a channel group at channel level. `Activation` and
    `Entropy` differ only in those two functions."""

    def output_statistics(self, output: torch.Tensor, dim: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def per_channel(self, stats: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def observe_forward(self, module: nn.Module, inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            return
        self._add(module, **self.output_statistics(output, _channel_dim(module, output)))

    def score(self, module: nn.Module) -> torch.Tensor:
        per_channel = self.per_channel(self._stats_of(module))
        return per_output(per_channel.to(module.weight.device), module.weight)

    def channel_scores(self, member: ChannelTensor) -> Optional[Dict[int, torch.Tensor]]:
        if member.gathered is None or 0 not in member.dims:
            return None
        return {0: self.per_channel(member.gathered)}


class Activation(ChannelActivation):
    """How each output neuron / filter fires on data, given to all the weights that feed it.

    Both kinds read the layer's output ``y`` as a ReLU passes it, max(y, 0): the post-activation
    output when a ReLU follows the layer, the convention of both criteria's papers. Over all
    samples and positions of the calibration data, ``kind="mean"`` ("activation") scores a channel
    by the mean of max(y, 0); ``kind="apoz"`` by 1 - APoZ, where APoZ (Average Percentage of Zeros)
    is the share of max(y, 0) that is zero (y <= 0). A channel that rarely fires scores low. With
    weight granularity the whole row (neuron or filter) goes at once, like `FilterNorm`. With
    channel granularity the same per-channel values are read on every layer of the group that
    outputs the channel (conv, linear, norm); a group that no layer outputs (the q/k or v positions
    inside attention) is scored by FilterNorm(2).

    >>> tp.prune(model, sparsity=0.5, importance=tp.importance.Activation("apoz"), data=batches)
    """

    _KINDS = ("mean", "apoz")
    channel_fallback = FilterNorm(p=2)

    def __init__(self, kind: str = "mean"):
        if kind not in self._KINDS:
            raise ValueError(f"`kind` must be one of {list(self._KINDS)}, got {kind!r}")
        super().__init__()
        self.kind = kind

    @staticmethod
    def output_statistics(output: torch.Tensor, dim: int) -> Dict[str, torch.Tensor]:
        """The float64 sums behind both kinds, per channel along ``dim`` of a layer's ``output``:
        ``positive`` (sum of max(y, 0)), ``zeros`` (count of y <= 0) and ``count`` (values per channel)."""
        values = _per_channel(output, dim)
        return dict(positive=values.clamp(min=0).sum(1), zeros=(values <= 0).sum(1).double(),
                    count=torch.tensor(float(values.shape[1]), dtype=torch.float64))

    def per_channel(self, stats: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The score of each channel from the sums of `output_statistics`."""
        if self.kind == "mean":
            return stats["positive"] / stats["count"]
        return 1.0 - stats["zeros"] / stats["count"]



class Entropy(ChannelActivation):
    """The information a channel carries: the entropy of its pooled activation over the data (Luo &
    Wu 2017, "An Entropy-based Pruning Method for CNN Compression"). A channel whose output hardly
    varies from sample to sample (dead, or constant) scores near 0 and goes first.

    Per sample, a channel's value is the mean of max(y, 0) over its spatial positions (a conv's
    global average pooling; for a Linear each row of the input, e.g. each token, is a sample), the
    ReLU convention of `Activation`. The values are counted in ``bins`` fixed bins and the score is
    the entropy -sum p log p (in nats) of the counts.

    **Binning.** Bins are a quarter octave wide on a log2 scale: a value v > 0 falls in bin
    floor(4 log2 v), clamped to the range 2^-24 .. 2^16 (160 bins), and values below 2^-24 (zeros)
    share one more bin. The paper bins each channel's values between their own minimum and
    maximum; fixed edges are chosen here because the counts then add up across batches, across the
    layers of a channel group and across DDP ranks, so the Pruner can observe training steps one at
    a time. A side effect: rescaling a channel's output shifts its values across bins but does not
    change how spread they are, so layers of different scale compare fairly in a global ranking.

    Weight granularity gives each row (neuron or filter) its channel's entropy; channel granularity
    reads the same counts on every layer of the group that outputs the channel.

    >>> tp.prune(model, 0.3, granularity="channel", importance="entropy", data=batches, example_inputs=x)
    """

    LOW, HIGH, PER_OCTAVE = -24, 16, 4
    BINS = (HIGH - LOW) * PER_OCTAVE + 1  # the quarter octaves, and the bin of values below 2^LOW
    channel_fallback = FilterNorm(p=2)

    @classmethod
    def output_statistics(cls, output: torch.Tensor, dim: int) -> Dict[str, torch.Tensor]:
        """``counts`` [channels, BINS]: how many samples' pooled values fell in each bin."""
        values = output.detach().clamp(min=0).movedim(dim, -1)
        channels = values.shape[-1]
        spatial = values.dim() - 1 - dim if dim >= 0 else 0  # the dims after the channel dim
        if spatial > 0:
            values = values.flatten(dim, dim + spatial - 1).mean(dim)  # mean over the positions
        values = values.reshape(-1, channels).double()
        low = 2.0 ** cls.LOW
        index = (cls.PER_OCTAVE * torch.log2(values.clamp(min=low))).floor() - cls.PER_OCTAVE * cls.LOW + 1
        index = torch.where(values < low, torch.zeros_like(index), index.clamp(1, cls.BINS - 1)).long()
        counts = torch.zeros(channels, cls.BINS, dtype=torch.float64)
        counts.scatter_add_(1, index.T, torch.ones_like(index.T, dtype=torch.float64))
        return {"counts": counts}

    @staticmethod
    def per_channel(stats: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The entropy (nats) of each channel's counts."""
        counts = stats["counts"]
        return torch.special.entr(counts / counts.sum(1, keepdim=True).clamp(min=1)).sum(1)  # -p ln p, 0 at p=0



class Wanda(ForwardStatistic):
    """|W_ij| * ||X_j||_2: each weight times the L2 norm of its input feature over all calibration
    inputs (Sun et al. 2023, "pruning by weights and activations").

    ``X_j`` is input feature j of a Linear over every sample and token, or input channel j of a
    conv over every sample and position (each kernel position of that channel gets the same norm).
    As in the paper the scores are compared within each output row: with ``scope="layer"`` (and a
    dict scope) `prune()` and the Pruner remove the same fraction from every row, and N:M groups lie
    within rows anyway. With ``scope="global"`` or a threshold the scores are compared across rows
    and layers as they are, which mixes the input scales of different layers (magnitude-like
    global ranking weighted by input size), so prefer ``scope="layer"`` with Wanda.
    """

    #: `prune()` and the Pruner select per output row for this criterion (per-layer amounts).
    compare_within_rows = True

    def observe_forward(self, module: nn.Module, inputs, output) -> None:
        x = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        if not isinstance(x, torch.Tensor):
            return
        values = _per_channel(x, _channel_dim(module, x))
        self._add(module, squares=values.square().sum(1))

    def score(self, module: nn.Module) -> torch.Tensor:
        norms = self._stats_of(module)["squares"].sqrt()
        weight = score_precision(effective_weight(module)).abs()
        if isinstance(module, nn.Linear):
            return weight * norms.to(weight)
        groups = module.groups
        per_group = weight.shape[1]  # input channels each filter sees
        out_per_group = weight.shape[0] // groups
        group_of_row = torch.arange(weight.shape[0], device=weight.device) // out_per_group
        index = group_of_row[:, None] * per_group + torch.arange(per_group, device=weight.device)[None, :]
        row_norms = norms.to(weight)[index]  # (out, in/groups)
        return weight * row_norms.view(*row_norms.shape, *([1] * (weight.dim() - 2)))
