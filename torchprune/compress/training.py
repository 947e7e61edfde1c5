"""The model the compress command's recovery trains: the pruned student itself, or a copy of it on
the sparse kernels (sparse fine-tuning), with its embedding tables frozen if asked.

Why: recovery quality on a fixed time budget grows with the steps it gets, and two costs of a
masked student's step buy nothing:

* a masked Linear multiplies its full dense weight forward and backward, pruned entries included;
  the sparse kernels (`tp.nn.SparseLinear`) work on the kept entries only and train them, forward
  and backward, so the same step is cheaper once most weights are gone;
* the embedding tables (not pruned) are half of MiniLM's parameters: training them costs a dense
  gradient of the whole table and an AdamW update of it every step, for the few rows a batch reads.
  Freezing them is an option, not the default: on MiniLM at 80% it made a step 1.28x faster on the
  sparse kernels but cost more quality than the extra steps won back (300 steps: 0.877 frozen,
  0.883 trained).

After recovery on a sparse copy, the trained values go back into the masked student (`copy_back`),
which is what the command saves, reloads and times.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from ..nn.sparse import SparseLayer
from ..sparsify import sparsify

__all__ = ["ON_CHOICES", "SPARSE_FROM", "training_copy", "copy_back", "freeze_embeddings", "restore_grad"]

#: --recover-on: "auto" (sparse kernels from SPARSE_FROM up), "sparse" or "masked"
ON_CHOICES = ("auto", "sparse", "masked")
#: the sparsity from which "auto" trains on the sparse kernels (measured on MiniLM: see the guide)
SPARSE_FROM = 0.7


def training_copy(student: nn.Module, sparsity: float, on: str, example_inputs: Sequence[torch.Tensor]) -> nn.Module:
    """The module recovery trains: a copy of ``student`` with every pruned Linear/Conv2d on the
    sparse kernels (``on`` "sparse", or "auto" at ``sparsity`` >= SPARSE_FROM), else ``student``.
    Layers whose weight is read outside their own forward stay masked (`tp.sparsify`'s trace)."""
    if on not in ON_CHOICES:
        raise ValueError(f"`on` must be one of {ON_CHOICES}, got {on!r}")
    if on == "masked" or (on == "auto" and sparsity < SPARSE_FROM):
        return student
    return sparsify(student, min_sparsity=0.0, example_inputs=tuple(example_inputs))


def freeze_embeddings(model: nn.Module) -> List[nn.Parameter]:
    """Stops the gradient of every ``nn.Embedding`` table of ``model``; returns the parameters it
    froze (for `restore_grad`)."""
    frozen = []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            module.weight.requires_grad_(False)
            frozen.append(module.weight)
    return frozen


def restore_grad(parameters: List[nn.Parameter]) -> None:
    for parameter in parameters:
        parameter.requires_grad_(True)


def copy_back(trained: nn.Module, student: nn.Module) -> None:
    """Writes the parameters of ``trained`` (a `training_copy` of ``student``) into ``student``: a
    sparse layer's kept values into the masked layer's weight (zeros elsewhere, where its mask is
    zero), every other parameter by name."""
    if trained is student:
        return
    sparse: Dict[str, nn.Module] = {name: m for name, m in trained.named_modules() if isinstance(m, SparseLayer)}
    own = dict(student.named_parameters())
    with torch.no_grad():
        for name, layer in sparse.items():
            dense, target = layer.to_dense(), student.get_submodule(name)
            target.weight.copy_(dense.weight)
            if dense.bias is not None:
                target.bias.copy_(dense.bias)
        for name, parameter in trained.named_parameters():
            if name.rpartition(".")[0] not in sparse:
                own[name].copy_(parameter)
