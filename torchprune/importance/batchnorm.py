"""`BNScale`: a layer's filters ranked by the |gamma| of the BatchNorm that follows (network slimming)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..layer_types import BATCH_NORMS
from ..masking import base_type
from .base import ChannelTensor, Importance, per_output, score_precision
from .weights import FilterNorm

__all__ = ["BNScale"]



class BNScale(Importance):
    """|gamma| of the BatchNorm that normalises each filter's output (network slimming, Liu et al. 2017).

    The BatchNorm of a layer is found by module order: the module registered right after the layer
    (``nn.Sequential(conv, bn, ...)`` or ``self.conv = ...; self.bn = ...``) when it is a BatchNorm
    over the layer's output channels; pass ``pairs={layer_name: bn_name}`` where the order does not
    tell. A layer without a BatchNorm cannot be scored: exclude it. Train with
    ``tp.regularize.bn_l1`` first so that the scales separate. Channels: |gamma| of the group's
    BatchNorm/InstanceNorm/LayerNorm scales; a group without one is scored by FilterNorm(2).

    >>> tp.prune(model, sparsity=0.3, importance="bn_scale", exclude=["fc"])
    """

    channel_fallback = FilterNorm(p=2)

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
                if not isinstance(bn, BATCH_NORMS) or bn.num_features != channels or bn.weight is None:
                    raise ValueError(f"`pairs[{name!r}]` must name an affine BatchNorm with {channels} features")
            else:
                following = position[id(layer)] + 1
                bn = named[following][1] if following < len(named) else None
                if not (isinstance(bn, BATCH_NORMS) and bn.num_features == channels and bn.weight is not None):
                    missing.append(name)
                    continue
            found[id(layer)] = bn
        if missing:
            raise ValueError(
                f"BNScale found no affine BatchNorm right after layers {missing} "
                f"({base_type(layers[missing[0]]).__name__}): "
                "exclude them, or name their BatchNorm with BNScale(pairs={layer_name: bn_name})"
            )
        self._bn = found

    def observed(self, module: nn.Module) -> bool:
        return id(module) in self._bn

    def score(self, module: nn.Module) -> torch.Tensor:
        bn = self._bn.get(id(module))
        if bn is None:
            raise RuntimeError("BNScale has no BatchNorm for this layer: call prepare(model, layers) first")
        gamma = score_precision(bn.weight.detach()).abs()
        return per_output(gamma.to(module.weight.device), module.weight)

    def channel_scores(self, member: ChannelTensor) -> Optional[Dict[int, torch.Tensor]]:
        if not member.norm_scale:
            return None
        return {dim: member.value.double().abs() for dim in member.dims}
