"""Criteria that read what flows through the network rather than the weights alone.

* `Activation` ranks a layer's output neurons / filters by how they fire on real data: the mean
  activation or the Average Percentage of Zeros (APoZ, Hu et al. 2016).
* `Wanda` (Sun et al. 2023) weighs each weight by the size of the input feature it multiplies.
* `BNScale` ranks a conv's filters by the |gamma| of the BatchNorm that follows it (network
  slimming, Liu et al. 2017).

`Activation` and `Wanda` accumulate statistics in forward hooks through `observe_forward()`:
`prune()` runs the ``data`` batches through the model (see `calibration.observe_activations`),
and the progressive Pruner observes the training forward passes (or its own ``data``).
These are re-exported by `torchprune.importance`.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .importance import Importance, _score_precision
from .masking import base_type, effective_weight

__all__ = ["Activation", "Wanda", "BNScale"]


def _per_output(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One value per output neuron / filter given to every weight of that row."""
    return values.view(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).clone()


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


class _ForwardStatistic(Importance):
    """Per-layer sums kept in float64 and updated by `observe_forward(module, inputs, output)`."""

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


class Activation(_ForwardStatistic):
    """How each output neuron / filter fires on data, given to all the weights that feed it.

    Statistics are taken on the layer's output as a following ReLU passes it, the convention of
    both criteria's papers: ``kind="mean"`` scores a channel by the mean of max(output, 0) over
    all samples and positions; ``kind="apoz"`` by 1 - APoZ, where APoZ is the fraction of its
    outputs that are <= 0 (zero after the ReLU). A channel that rarely fires scores low. With
    weight granularity the whole row (neuron or filter) goes at once, like `FilterNorm`.

    >>> tp.prune(model, sparsity=0.5, importance=tp.importance.Activation("apoz"), data=batches)
    """

    _KINDS = ("mean", "apoz")

    def __init__(self, kind: str = "mean"):
        if kind not in self._KINDS:
            raise ValueError(f"`kind` must be one of {list(self._KINDS)}, got {kind!r}")
        super().__init__()
        self.kind = kind

    def observe_forward(self, module: nn.Module, inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            return
        values = _per_channel(output, _channel_dim(module, output))
        self._add(module, positive=values.clamp(min=0).sum(1), zeros=(values <= 0).sum(1).double(),
                  count=torch.tensor(float(values.shape[1]), dtype=torch.float64))

    def score(self, module: nn.Module) -> torch.Tensor:
        stats = self._stats_of(module)
        if self.kind == "mean":
            per_channel = stats["positive"] / stats["count"]
        else:
            per_channel = 1.0 - stats["zeros"] / stats["count"]
        return _per_output(per_channel.to(module.weight.device), module.weight)


class Wanda(_ForwardStatistic):
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
        weight = _score_precision(effective_weight(module)).abs()
        if isinstance(module, nn.Linear):
            return weight * norms.to(weight)
        groups = module.groups
        per_group = weight.shape[1]  # input channels each filter sees
        out_per_group = weight.shape[0] // groups
        group_of_row = torch.arange(weight.shape[0], device=weight.device) // out_per_group
        index = group_of_row[:, None] * per_group + torch.arange(per_group, device=weight.device)[None, :]
        row_norms = norms.to(weight)[index]  # (out, in/groups)
        return weight * row_norms.view(*row_norms.shape, *([1] * (weight.dim() - 2)))


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


class BNScale(Importance):
    """|gamma| of the BatchNorm that normalises each filter's output (network slimming).

    The BatchNorm of a layer is found by module order: the module registered right after the layer
    (``nn.Sequential(conv, bn, ...)`` or ``self.conv = ...; self.bn = ...``) when it is a BatchNorm
    over the layer's output channels; pass ``pairs={layer_name: bn_name}`` where the order does not
    tell. A layer without a BatchNorm cannot be scored: exclude it. Train with
    ``tp.regularize.bn_l1`` first so that the scales separate.

    >>> tp.prune(model, sparsity=0.3, importance="bn_scale", exclude=["fc"])
    """

    def __init__(self, pairs: Optional[Dict[str, str]] = None):
        if pairs is not None and (not isinstance(pairs, dict) or
                                  not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items())):
            raise TypeError("`pairs` must be None or a dict {layer_name: batchnorm_name}")
        self.pairs = dict(pairs) if pairs else None
        self._bn: Dict[int, nn.Module] = {}

    def prepare(self, model: nn.Module, layers: Dict[str, nn.Module]) -> None:
        named = list(model.named_modules())
        every = dict(model.named_modules(remove_duplicate=False))
        position = {id(m): i for i, (_, m) in enumerate(named)}
        found, missing = {}, []
        for name, layer in layers.items():
            channels = layer.weight.shape[0]
            if self.pairs and name in self.pairs:
                bn = every.get(self.pairs[name])
                if not isinstance(bn, _BN_TYPES) or bn.num_features != channels or bn.weight is None:
                    raise ValueError(f"`pairs[{name!r}]` must name an affine BatchNorm with {channels} features")
            else:
                following = position[id(layer)] + 1
                bn = named[following][1] if following < len(named) else None
                if not (isinstance(bn, _BN_TYPES) and bn.num_features == channels and bn.weight is not None):
                    missing.append(name)
                    continue
            found[id(layer)] = bn
        if missing:
            raise ValueError(
                f"BNScale found no affine BatchNorm right after layers {missing} ({base_type(layers[missing[0]]).__name__}): "
                "exclude them, or name their BatchNorm with BNScale(pairs={layer_name: bn_name})"
            )
        self._bn = found

    def observed(self, module: nn.Module) -> bool:
        return id(module) in self._bn

    def score(self, module: nn.Module) -> torch.Tensor:
        bn = self._bn.get(id(module))
        if bn is None:
            raise RuntimeError("BNScale has no BatchNorm for this layer: call prepare(model, layers) first")
        gamma = _score_precision(bn.weight.detach()).abs()
        return _per_output(gamma.to(module.weight.device), module.weight)
