"""Running calibration data through a model for data-driven importance, without side effects.

Data-driven criteria need forward (and, for gradient criteria, backward) passes; pruning must not
change anything else.
The passes run in eval mode (no BatchNorm statistic updates, no dropout) with gradients enabled
even when the caller is under ``torch.no_grad()`` or ``torch.inference_mode()``, and afterwards
every parameter's ``.grad`` and every submodule's own train/eval flag are restored.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List

import torch
from torch import nn

__all__ = ["preserved_state", "hooked_eval", "observe_gradients", "observe_activations", "observe"]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[List[torch.nn.Parameter]]:
    """Restores the parameters' gradients and each submodule's train/eval flag on exit."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield params
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def hooked_eval(model: nn.Module, handles: List) -> Iterator[None]:
    """Forward passes for observation only: eval mode under ``no_grad`` while the hooks behind
    ``handles`` are in place; on exit the hooks are removed and every gradient and train/eval flag
    is restored (see :func:`preserved_state`)."""
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            yield
    finally:
        for handle in handles:
            handle.remove()


def _autograd_ready(value):
    """Inference-mode tensors cannot enter autograd: a normal clone of them (nested in tuples)."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        return value.clone()
    if type(value) in (tuple, list):
        return type(value)(_autograd_ready(v) for v in value)
    return value


def observe_gradients(
    model: nn.Module, layers: Dict[str, nn.Module], criterion, data: Iterable, loss_fn: Callable
) -> None:
    """One backward pass per ``(inputs, targets)`` batch of ``data``; after each, the criterion
    observes every layer of ``layers``. Raises ValueError if a layer got no gradient at all."""
    batches = 0
    with preserved_state(model) as params, torch.inference_mode(False), torch.enable_grad():
        model.eval()
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"`data` must yield (inputs, targets) pairs, got {type(batch).__name__}")
            inputs, targets = _autograd_ready(batch[0]), _autograd_ready(batch[1])
            for p in params:
                p.grad = None
            output = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
            loss_fn(output, targets).backward()
            for layer in layers.values():
                criterion.observe(layer)
            batches += 1
    if batches == 0:
        raise ValueError("`data` yielded no batches")
    silent = [name for name, layer in layers.items() if not criterion.observed(layer)]
    if silent:
        raise ValueError(
            f"layers {silent} received no gradient from `data` and `loss_fn` (frozen with "
            "requires_grad=False, or not used by the forward): exclude them with `exclude`"
        )


def _inputs_of(batch):
    """The model inputs of a batch: the first element of an ``(inputs, targets)`` pair, or the batch."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise TypeError(f"`data` must yield (inputs, targets) pairs or input tensors, got a {type(batch).__name__} of {len(batch)}")
        return batch[0]
    if isinstance(batch, torch.Tensor):
        return batch
    raise TypeError(f"`data` must yield (inputs, targets) pairs or input tensors, got {type(batch).__name__}")


def observe_activations(model: nn.Module, layers: Dict[str, nn.Module], criterion, data: Iterable) -> None:
    """One forward pass per batch of ``data`` (``(inputs, targets)`` pairs or bare inputs) in eval mode
    under ``no_grad``; forward hooks hand each layer's inputs and output to
    ``criterion.observe_forward(layer, inputs, output)``. Raises ValueError if a layer never ran."""
    batches = 0

    def hook(module, inputs, output):
        criterion.observe_forward(module, inputs, output)

    with hooked_eval(model, [layer.register_forward_hook(hook) for layer in layers.values()]):
        for batch in data:
            inputs = _inputs_of(batch)
            model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
            batches += 1
    if batches == 0:
        raise ValueError("`data` yielded no batches")
    silent = [name for name, layer in layers.items() if not criterion.observed(layer)]
    if silent:
        raise ValueError(f"layers {silent} were not called by the forward on `data`: exclude them with `exclude`")


def observe(model: nn.Module, layers: Dict[str, nn.Module], criterion, data: Iterable, loss_fn=None) -> None:
    """Feeds ``data`` to a data-driven criterion: backward passes when it needs a loss
    (``criterion.requires_loss``), forward passes otherwise."""
    if getattr(criterion, "requires_loss", False):
        observe_gradients(model, layers, criterion, data, loss_fn)
    else:
        observe_activations(model, layers, criterion, data)
