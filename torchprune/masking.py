"""Attaching, reading, making permanent and removing weight masks, and which layers can be masked.

`attach_mask` turns a plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` into its masked class from
``torchprune.nn.masked`` (that module says why a class swap and not ``torch.nn.utils.parametrize``,
and how the optimizer hook keeps pruned weights at zero); `remove_mask` and `make_permanent` turn it
back. Every entry point that prunes goes through here, after `check_supported` has refused, up
front, layers on a device or with a dtype the masked ops cannot run.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .nn.masked import (
    BASE_CLASS,
    MASKED_CLASS,
    MaskedConv1d,
    MaskedConv2d,
    MaskedLinear,
    enforce_mask,
    get_mask,
    release_mask,
)
from .ops.devices import kernel_devices

# MaskedLinear, MaskedConv1d, MaskedConv2d and get_mask live in torchprune.nn.masked; they stay
# importable from here, where they were public (and where old pickles of masked models find them).
__all__ = [
    "PRUNABLE_TYPES",
    "MaskedLinear",
    "MaskedConv1d",
    "MaskedConv2d",
    "attach_mask",
    "get_mask",
    "remove_mask",
    "put_back",
    "masks",
    "make_permanent",
    "prunable_layers",
    "effective_weight",
    "check_supported",
]

#: Layer types `prune()` can mask (exact types; user subclasses with their own forward are skipped).
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def is_prunable(module: nn.Module) -> bool:
    """True for the exact layer types we mask, masked or not yet."""
    return type(module) in MASKED_CLASS or type(module) in BASE_CLASS


def base_type(module: nn.Module) -> type:
    """The plain torch layer type of a (possibly masked) layer."""
    return BASE_CLASS.get(type(module), type(module))


def prunable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """All maskable layers of ``model`` by qualified name, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if is_prunable(m)}


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
        module.__class__ = MASKED_CLASS[type(module)]
        module.register_buffer("weight_mask", mask.clone() if copy else mask)
    enforce_mask(module)
    with torch.no_grad():
        weight.masked_fill_(~module.weight_mask, 0)


def remove_mask(module: nn.Module) -> None:
    """Drops the mask and restores the plain layer class; the weights are left as they are."""
    if get_mask(module) is None:
        return
    del module._buffers["weight_mask"]
    module.__class__ = BASE_CLASS[type(module)]
    release_mask(module)


def put_back(module: nn.Module, weight: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """Restores a layer saved as (``weight`` clone, ``mask`` clone or None): the weight exactly,
    the mask and the class (a layer unmasked before is plain again). For callers that prune to try
    something and must leave the layer as it was (sensitivity, a failed sequential prune)."""
    with torch.no_grad():
        module.weight.copy_(weight)
    if mask is None:
        remove_mask(module)
    else:
        attach_mask(module, mask)
        with torch.no_grad():
            module.weight.copy_(weight)  # attach_mask zeroes what the mask prunes: the saved values exactly


def masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The masks of all pruned layers, by qualified module name (true = kept).

    >>> tp.prune(model, sparsity=0.5)
    >>> {name: m.float().mean().item() for name, m in tp.masks(model).items()}
    """
    return {name: m.weight_mask for name, m in model.named_modules() if get_mask(m) is not None}


def masked_fraction(model: nn.Module) -> float:
    """The fraction of the masked layers' weights that their masks prune (0.0 without masks): the
    sparsity a pruning call achieved on the layers it pruned, layers it left alone not counted."""
    kept = list(masks(model).values())
    return sum(int((~m).sum()) for m in kept) / max(1, sum(m.numel() for m in kept))


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
