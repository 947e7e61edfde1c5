"""Dynamic sparsity with regrowth for `tp.Pruner`: RigL (Evci et al. 2020), ``regrow=``.

At a regrowth step each pruned layer swaps some of its weights: the kept weights the Pruner's
criterion scores lowest are pruned, and as many weights that were pruned before the step come
back, those with the largest gradient magnitude. The layer's sparsity does not change. A weight
that comes back starts at zero with its optimizer moments at zero.

Why RigL and not DNS-style splicing (a weight returns when its magnitude crosses back above a
threshold): a pruned weight gets no gradient through the masked op and the optimizer keeps it at
zero, so its magnitude never moves and splicing would need the pruned weights to keep training
densely. RigL needs the dense gradient only at the regrowth steps, and it keeps the sparsity exact
by construction.

The dense gradient is the gradient of the loss with respect to the layer's *effective* weight
(weight times mask), at pruned positions too. The masked op's backward returns zero there, so
`DenseGradients` computes it from the layer's input and output gradient during the training step
just before a regrowth step (forward hooks, armed for that step only): ``grad_out^T x`` for a
Linear, the convolution's weight gradient for a Conv1d/Conv2d. The other steps cost nothing.

Optimizer moments: the masked layers' optimizer hook (nn/masked.py) zeroes the optimizer state of
pruned entries after every optimizer step, and only weights that were pruned during the step
before the swap may come back, so their moments are already zero when they return; the swap zeroes
their values.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Dict, Optional

import torch
from torch import nn

from .nn.conv import conv_input_and_padding

__all__ = ["Regrow", "DenseGradients", "weight_gradient", "checked_regrow"]

DECAYS = ("cosine", "constant")


def _check_step(value, what: str, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"`{what}` must be a non-negative int{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


class Regrow:
    """When and how much a `tp.Pruner` regrows: ``tp.Pruner(..., regrow=tp.Regrow(0.3, every=100,
    end=5000))``.

    * ``fraction``: the share of each layer's kept weights swapped at a regrowth step (RigL's alpha),
      in (0, 1];
    * ``every``, ``begin``, ``end``: regrowth steps are ``begin, begin + every, ...`` up to ``end``;
      None takes the Pruner schedule's own (so the swaps happen at its pruning updates). Regrowth
      may go on after the schedule has reached its final sparsity: that is dynamic sparse training
      at a fixed sparsity;
    * ``decay``: "cosine" (RigL: fraction * (1 + cos(pi * (step - begin) / (end - begin))) / 2) or
      "constant".

    ``regrow=0.3`` is ``Regrow(0.3)``: swap 30% (decaying) at each of the schedule's updates.
    """

    def __init__(self, fraction: float = 0.3, every: Optional[int] = None, begin: Optional[int] = None,
                 end: Optional[int] = None, decay: str = "cosine"):
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < float(fraction) <= 1:
            raise ValueError(f"`fraction` must be a number in (0, 1], got {fraction!r}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1):
            raise ValueError(f"`every` must be a positive int or None, got {every!r}")
        if decay not in DECAYS:
            raise ValueError(f"`decay` must be one of {DECAYS}, got {decay!r}")
        self.fraction = float(fraction)
        self.every = None if every is None else int(every)
        self.begin = _check_step(begin, "begin")
        self.end = _check_step(end, "end")
        if self.begin is not None and self.end is not None and self.end < self.begin:
            raise ValueError(f"`end` must be >= `begin` ({self.begin}), got {end!r}")
        self.decay = decay

    def resolved(self, schedule) -> "Regrow":
        """A copy with every None taken from ``schedule`` (a `tp.schedules.Schedule`)."""
        begin = schedule.begin if self.begin is None else self.begin
        end = schedule.end if self.end is None else self.end
        if end < begin:
            raise ValueError(f"regrowth would end at step {end}, before it begins at step {begin}: "
                             "give `tp.Regrow` its own `begin` and `end`")
        return Regrow(self.fraction, schedule.every if self.every is None else self.every, begin, end, self.decay)

    def is_update(self, step: int) -> bool:
        """Whether weights are swapped at ``step`` (of a resolved Regrow)."""
        return self.begin <= step <= self.end and (step - self.begin) % self.every == 0

    def fraction_at(self, step: int) -> float:
        """The share of kept weights swapped at ``step`` (of a resolved Regrow)."""
        if self.decay == "constant" or self.end == self.begin:
            return self.fraction
        progress = min(max((step - self.begin) / (self.end - self.begin), 0.0), 1.0)
        return self.fraction * (1 + math.cos(math.pi * progress)) / 2

    def __repr__(self) -> str:
        return (f"Regrow(fraction={self.fraction}, every={self.every}, begin={self.begin}, end={self.end}, "
                f"decay={self.decay!r})")


def checked_regrow(regrow) -> Optional[Regrow]:
    """``regrow=`` as a `Regrow` (a number is its fraction), or None when off."""
    if regrow is None or regrow is False:
        return None
    if isinstance(regrow, Regrow):
        return regrow
    if isinstance(regrow, numbers.Real) and not isinstance(regrow, bool):
        return Regrow(regrow)
    raise TypeError(f"`regrow` must be None, a fraction in (0, 1] or a tp.Regrow, got {type(regrow).__name__}")


def weight_gradient(layer: nn.Module, x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The gradient of the loss with respect to ``layer``'s (effective) weight, dense, from the
    input ``x`` the layer was called with and the gradient of its output."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        g = grad_output.reshape(-1, weight.shape[0]).to(weight.dtype)
        return g.t() @ x.reshape(-1, weight.shape[1]).to(weight.dtype)
    unbatched = x.dim() == weight.dim() - 1
    if unbatched:
        x, grad_output = x.unsqueeze(0), grad_output.unsqueeze(0)
    x, padding = conv_input_and_padding(layer, x)
    if isinstance(padding, int):
        padding = (padding,) * (weight.dim() - 2)
    gradient = torch.nn.grad.conv2d_weight if weight.dim() == 4 else torch.nn.grad.conv1d_weight
    return gradient(x.to(weight.dtype), weight.shape, grad_output.to(weight.dtype), layer.stride, padding,
                    layer.dilation, layer.groups)


class DenseGradients:
    """The dense weight gradients of some layers over the training steps it is armed for.

    `arm()` hooks the layers' forward passes: each pass in train mode with autograd on records its
    input and, when the backward reaches the output, adds `weight_gradient` to the sum of the
    layer's weight owner (``owners``: layer name -> the name of the layer whose weight it uses, so
    that layers sharing one weight add up into one gradient). `disarm()` removes the hooks;
    `take()` returns the sums and clears them."""

    def __init__(self, layers: Dict[str, nn.Module], owners: Optional[Dict[str, str]] = None):
        self.layers = layers
        self.owners = {name: name for name in layers} if owners is None else dict(owners)
        self.sums: Dict[str, torch.Tensor] = {}
        self._handles = []

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if not self._handles:
            self._handles = [layer.register_forward_hook(GradientHook(self, self.owners[name]))
                             for name, layer in self.layers.items()]

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def record(self, name: str, module: nn.Module, inputs, output) -> None:
        if not (module.training and torch.is_tensor(output) and output.requires_grad):
            return
        x = inputs[0].detach()

        def add(grad_output: torch.Tensor) -> None:
            with torch.no_grad():
                gradient = weight_gradient(module, x, grad_output.detach())
                total = self.sums.get(name)
                self.sums[name] = gradient if total is None else total + gradient

        output.register_hook(add)

    def take(self) -> Dict[str, torch.Tensor]:
        sums, self.sums = self.sums, {}
        return sums


class GradientHook:
    """The forward hook of `DenseGradients`. It holds its owner weakly, and a copy of it (the model
    deep-copied or pickled while armed) records nothing."""

    def __init__(self, owner: Optional[DenseGradients], name: str):
        self._owner = weakref.ref(owner) if owner is not None else None
        self._name = name

    def __call__(self, module, inputs, output) -> None:
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            owner.record(self._name, module, inputs, output)

    def __reduce__(self):
        return GradientHook, (None, self._name)
