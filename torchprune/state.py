"""Guards that run passes through a model and leave its state as they found it.

`preserved_state` restores every parameter's ``.grad`` and every submodule's own train/eval
flag; `hooked_eval` runs observation-only forward passes (eval mode, no grad) and removes the
forward hooks it was handed. Calibration, tracing, block removal and the analysis passes share them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
from torch import nn

__all__ = ["preserved_state", "hooked_eval"]


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
