"""The masked layers: ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` whose forward skips pruned weights.

A pruned layer keeps its ``weight`` parameter unchanged in name and shape and gains a bool buffer
``weight_mask`` of the same shape; its class is swapped (by ``torchprune.masking.attach_mask``) to
a thin subclass (``MaskedLinear`` for an ``nn.Linear``, and so on) whose forward runs the C++ masked
op. We chose this over ``torch.nn.utils.parametrize`` because:

* the state_dict keeps the plain ``weight`` key (parametrize renames it to
  ``parametrizations.weight.original``, which breaks loading into an unpruned model);
* the forward is one custom op with a fake kernel, so ``torch.compile(fullgraph=True)`` and
  ``torch.export`` trace it without graph breaks, and the backward returns a weight gradient that is
  exactly zero at pruned positions;
* ``isinstance(layer, nn.Linear)`` still holds, and copy/deepcopy/pickle work because the subclasses
  are importable module-level classes (old pickles name them ``torchprune.masking.MaskedLinear``,
  which ``torchprune.masking`` still re-exports).

Keeping pruned weights exactly zero through any optimizer: the gradient is zero there, but momentum
or Adam moments accumulated *before* pruning would still move the weight. A global optimizer
post-step hook, registered when this module is imported, therefore re-zeroes the pruned entries of
masked weights, and of the optimizer state tensors of the same shape (momentum, Adam moments), for
the parameters of the optimizer that stepped.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import ops
from .conv import conv_input_and_padding

__all__ = [
    "MaskedLinear",
    "MaskedConv1d",
    "MaskedConv2d",
    "MASKED_CLASS",
    "BASE_CLASS",
    "get_mask",
    "enforce_mask",
    "release_mask",
]

# The masked layers whose pruned weights the optimizer hook keeps at zero (weak: a deleted model goes).
_ENFORCED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _MaskedMixin:
    """Shared behaviour of the masked layer classes: registration for optimizer-step enforcement."""

    weight_mask: torch.Tensor

    def __setstate__(self, state):  # deepcopy and unpickling build a new module through here
        super().__setstate__(state)
        _ENFORCED.add(self)


class MaskedLinear(_MaskedMixin, nn.Linear):
    """An ``nn.Linear`` whose forward uses ``weight`` only where ``weight_mask`` is true."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.masked_linear(x, self.weight, self.weight_mask, self.bias)


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """An ``nn.Conv2d`` whose forward uses ``weight`` only where ``weight_mask`` is true."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        x, padding = conv_input_and_padding(self, x)
        y = ops.masked_conv2d(
            x, self.weight, self.weight_mask, self.bias, self.stride, padding, self.dilation, self.groups
        )
        return y.squeeze(0) if unbatched else y


class MaskedConv1d(_MaskedMixin, nn.Conv1d):
    """An ``nn.Conv1d`` whose forward uses ``weight`` only where ``weight_mask`` is true.

    Runs as a 2-D convolution with a height-1 kernel, so it shares the conv2d kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        x, padding = conv_input_and_padding(self, x)
        padding = padding if isinstance(padding, int) else padding[0]
        y = ops.masked_conv2d(
            x.unsqueeze(2),
            self.weight.unsqueeze(2),
            self.weight_mask.unsqueeze(2),
            self.bias,
            (1, self.stride[0]),
            (0, padding),
            (1, self.dilation[0]),
            self.groups,
        ).squeeze(2)
        return y.squeeze(0) if unbatched else y


#: The masked class of each plain layer type, and back (exact types: user subclasses are not masked).
MASKED_CLASS: Dict[type, type] = {nn.Linear: MaskedLinear, nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d}
BASE_CLASS: Dict[type, type] = {masked: base for base, masked in MASKED_CLASS.items()}


def get_mask(module: nn.Module) -> Optional[torch.Tensor]:
    """The bool mask of a pruned layer (true = kept), or None if the layer is not masked."""
    if type(module) in BASE_CLASS:
        return module.weight_mask
    return None


def enforce_mask(module: nn.Module) -> None:
    """From now on, every optimizer step that updates ``module.weight`` re-zeroes its pruned entries."""
    _ENFORCED.add(module)


def release_mask(module: nn.Module) -> None:
    """Undoes `enforce_mask` (for a layer whose mask was removed)."""
    _ENFORCED.discard(module)


def _enforce_masks(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimizer post-step hook: pruned weights (and their optimizer state) back to exactly zero."""
    if not _ENFORCED:
        return
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for module in list(_ENFORCED):
            mask = get_mask(module)
            weight = getattr(module, "weight", None)
            if mask is None or weight is None or id(weight) not in params:
                continue
            pruned = ~mask
            weight.masked_fill_(pruned, 0)
            for value in optimizer.state.get(weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    value.masked_fill_(pruned, 0)


register_optimizer_step_post_hook(_enforce_masks)
