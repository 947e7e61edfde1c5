"""The teacher's outputs kept from one round over the data to the next: ``tp.recover(teacher_cache=True)``.

Why: distillation calls the dense teacher at every step, but the teacher is fixed and runs in eval
mode, so when ``data`` is a list of batches gone over again and again it gives the same outputs for
a batch in every round. Keeping them the first time saves the teacher's forward from the second
round on. On all-MiniLM-L6-v2 at 90% on 2 cores a recovery step took 0.433 s in the first round
and 0.277 s from the second on, and the compress command's recoveries go over their text ten times
or more.

The outputs are kept in bfloat16: half the memory of float32 (on MiniLM, 384 features for the
output and each of its six blocks: 5.4 KB a token, 1.74 GB for the compress command's 16,225
sentences). Its rounding, 2^-9 relative, is far below the distance between a pruned student and its
teacher (one minus cosine is 0.05 or more). The targets are rounded in the first round too, so a
run resumed from a checkpoint, with an empty cache, computes exactly what the uninterrupted run did.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

__all__ = ["TeacherCache", "STORED"]

#: the dtype the cache keeps floating-point outputs in
STORED = torch.bfloat16

Targets = Tuple[Tensor, Dict[str, Tensor]]


def _kept(tensor: Tensor) -> Tuple[Tensor, torch.dtype]:
    stored = tensor.detach().to(STORED) if tensor.is_floating_point() else tensor.detach().clone()
    return stored.contiguous(), tensor.dtype


class TeacherCache:
    """The teacher's targets (the distilled output tensor and the intermediate layers' outputs) of
    each position in a round over ``data``, computed the first time a position is reached."""

    def __init__(self) -> None:
        self.entries: Dict[int, Tuple[Tuple[Tensor, torch.dtype], Dict[str, Tuple[Tensor, torch.dtype]]]] = {}

    def targets(self, position: int, compute: Callable[[], Targets]) -> Targets:
        """The targets of the batch at ``position``: from the cache, else ``compute()``'s, kept. Both
        come back rounded through `STORED`, in the dtype the teacher gave."""
        entry = self.entries.get(position)
        if entry is None:
            output, layers = compute()
            entry = (_kept(output), {name: _kept(value) for name, value in layers.items()})
            self.entries[position] = entry
        (output, dtype), layers = entry
        return output.to(dtype), {name: value.to(kind) for name, (value, kind) in layers.items()}

    @property
    def nbytes(self) -> int:
        """The memory the kept outputs take."""
        total = 0
        for (output, _), layers in self.entries.values():
            total += output.nbytes + sum(value.nbytes for value, _ in layers.values())
        return total
