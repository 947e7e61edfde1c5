"""Attaching, reading, making permanent and removing weight masks.

A pruned layer keeps its ``weight`` parameter unchanged in name and shape and gains a bool buffer
``weight_mask`` of the same shape; its class is swapped to a thin subclass (``MaskedLinear`` for an
``nn.Linear``, and so on) whose forward runs the C++ masked op. We chose this over
``torch.nn.utils.parametrize`` because:

* the state_dict keeps the plain ``weight`` key (parametrize renames it to
  ``parametrizations.weight.original``, which breaks loading into an unpruned model);
* the forward is one custom op with a fake kernel, so ``torch.compile(fullgraph=True)`` and
  ``torch.export`` trace it without graph breaks, and the backward returns a weight gradient that is
  exactly zero at pruned positions;
* ``isinstance(layer, nn.Linear)`` still holds, and copy/deepcopy/pickle work because the subclasses
  are importable module-level classes.

Keeping pruned weights exactly zero through any optimizer: the gradient is zero there, but momentum
or Adam moments accumulated *before* pruning would still move the weight. A global optimizer
post-step hook therefore re-zeroes the pruned entries of masked weights, and of the optimizer state
tensors of the same shape (momentum, Adam moments), for the parameters of the optimizer that stepped.
"""

from __future__ import annotations

import math
import weakref
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import ops as _ops
from .ops.devices import kernel_devices

__all__ = [
    "PRUNABLE_TYPES",
    "MaskedLinear",
    "MaskedConv1d",
    "MaskedConv2d",
    "attach_mask",
    "get_mask",
    "remove_mask",
    "masks",
    "sparsity",
    "make_permanent",
    "prunable_layers",
    "effective_weight",
    "check_supported",
]

#: Layer types `prune()` can mask (exact types; user subclasses with their own forward are skipped).
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)

_MASKED_MODULES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _MaskedMixin:
    """Shared behaviour of the masked layer classes: registration for optimizer-step enforcement."""

    weight_mask: torch.Tensor

    def __setstate__(self, state):  # deepcopy and unpickling build a new module through here
        super().__setstate__(state)
        _MASKED_MODULES.add(self)


class MaskedLinear(_MaskedMixin, nn.Linear):
    """An ``nn.Linear`` whose forward uses ``weight`` only where ``weight_mask`` is true."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.masked_linear(x, self.weight, self.weight_mask, self.bias)


def _conv_input_and_padding(conv: nn.Module, x: torch.Tensor):
    """Applies the padding nn.ConvNd would apply itself for non-'zeros' modes and string padding."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        return x, 0
    return x, conv.padding


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """An ``nn.Conv2d`` whose forward uses ``weight`` only where ``weight_mask`` is true."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        x, padding = _conv_input_and_padding(self, x)
        y = _ops.masked_conv2d(
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
        x, padding = _conv_input_and_padding(self, x)
        padding = padding if isinstance(padding, int) else padding[0]
        y = _ops.masked_conv2d(
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


_MASKED_CLASS = {nn.Linear: MaskedLinear, nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d}
_BASE_CLASS = {masked: base for base, masked in _MASKED_CLASS.items()}


def is_prunable(module: nn.Module) -> bool:
    """True for the exact layer types we mask, masked or not yet."""
    return type(module) in _MASKED_CLASS or type(module) in _BASE_CLASS


def base_type(module: nn.Module) -> type:
    """The plain torch layer type of a (possibly masked) layer."""
    return _BASE_CLASS.get(type(module), type(module))


def prunable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """All maskable layers of ``model`` by qualified name, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if is_prunable(m)}


def get_mask(module: nn.Module) -> Optional[torch.Tensor]:
    """The bool mask of a pruned layer (true = kept), or None if the layer is not masked."""
    if type(module) in _BASE_CLASS:
        return module.weight_mask
    return None


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer really computes with: zero where the mask prunes it."""
    mask = get_mask(module)
    weight = module.weight.detach()
    return weight if mask is None else torch.where(mask, weight, torch.zeros((), dtype=weight.dtype))


#: Weight dtypes the masked ops compute in (float8 and integer weights are refused by name).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_supported(layers: Dict[str, nn.Module], argument: str = "model") -> None:
    """Raises before anything is masked if a layer sits on a device, or holds a weight dtype, that
    the masked ops cannot run on."""
    devices = kernel_devices("masked_linear")
    for name, layer in layers.items():
        if layer.weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"`{argument}` layer {name!r} has {layer.weight.dtype} weights; the masked ops take "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}: convert the layer first (e.g. layer.float())"
            )
        device = layer.weight.device
        if device.type == "meta":  # no values to rank or mask: refuse rather than make meta masks
            raise ValueError(
                f"`{argument}` layer {name!r} is on meta; this build's masked ops run on "
                f"{', '.join(devices)} only, and a meta tensor holds no values to rank or mask: "
                "materialize the model first (model.to_empty(device='cpu'), then load its weights)"
            )
        if device.type not in devices:
            raise ValueError(
                f"`{argument}` layer {name!r} is on {device}; this build's masked ops run on "
                f"{', '.join(devices)} only: prune on CPU (model.cpu()), or use a CUDA build "
                "(setup.py: FORCE_CUDA=1)"
            )


def attach_mask(module: nn.Module, mask: torch.Tensor, copy: bool = True) -> None:
    """Makes ``module`` a masked layer with ``mask`` (true = kept) and zeroes its pruned weights.

    A layer that is already masked gets its mask replaced in place (same buffer object, so optimizer
    hooks and state_dict references stay valid). With ``copy=False`` a new mask buffer is ``mask``
    itself (no copy: prune() hands over masks it made, and tied layers share one mask object).
    """
    if not is_prunable(module):
        raise TypeError(
            f"`module` must be one of {[t.__name__ for t in PRUNABLE_TYPES]}, got {type(module).__name__}"
        )
    weight = module.weight
    if mask.shape != weight.shape:
        raise ValueError(f"`mask` must have the weight's shape {list(weight.shape)}, got {list(mask.shape)}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    existing = get_mask(module)
    if existing is not None:
        existing.copy_(mask)
    else:
        module.__class__ = _MASKED_CLASS[type(module)]
        module.register_buffer("weight_mask", mask.clone() if copy else mask)
    _MASKED_MODULES.add(module)
    with torch.no_grad():
        weight.masked_fill_(~module.weight_mask, 0)


def remove_mask(module: nn.Module) -> None:
    """Drops the mask and restores the plain layer class; the weights are left as they are."""
    if get_mask(module) is None:
        return
    del module._buffers["weight_mask"]
    module.__class__ = _BASE_CLASS[type(module)]
    _MASKED_MODULES.discard(module)


def masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The masks of all pruned layers, by qualified module name (true = kept).

    >>> tp.prune(model, sparsity=0.5)
    >>> {name: m.float().mean().item() for name, m in tp.masks(model).items()}
    """
    return {name: m.weight_mask for name, m in model.named_modules() if get_mask(m) is not None}


def sparsity(model: nn.Module) -> float:
    """Fraction of zero entries in the effective weights of all prunable layers (0.0 if none).

    Counts masked-out weights and weights that are exactly zero (e.g. after `make_permanent`),
    and the dense weights of ``tp.nn`` sparse layers (their unstored entries and stored zeros).

    >>> tp.prune(model, sparsity=0.9, scope="global")
    >>> round(tp.sparsity(model), 3)
    0.9
    """
    from .nn import _SparseLayer  # imported here: nn imports this module

    zeros = total = 0
    seen = set()  # a weight tied between layers counts once
    for layer in prunable_layers(model).values():
        if id(layer.weight) in seen:
            continue
        seen.add(id(layer.weight))
        weight = effective_weight(layer)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    for layer in {id(m): m for m in model.modules() if isinstance(m, _SparseLayer)}.values():
        numel = math.prod(layer._dense_shape)
        zeros += numel - int(torch.count_nonzero(layer.values.detach()))
        total += numel
    return zeros / total if total else 0.0


def make_permanent(model: nn.Module) -> nn.Module:
    """Zeroes the pruned weights for good and drops the masks: plain torch layers come back.

    >>> tp.prune(model, sparsity=0.8)
    >>> tp.make_permanent(model)          # state_dict now loads into an unpruned model
    """
    for module in list(model.modules()):
        mask = get_mask(module)
        if mask is None:
            continue
        with torch.no_grad():
            module.weight.masked_fill_(~mask, 0)
        remove_mask(module)
    return model


def _enforce_masks(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimizer post-step hook: pruned weights (and their optimizer state) back to exactly zero."""
    if not _MASKED_MODULES:
        return
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for module in list(_MASKED_MODULES):
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
