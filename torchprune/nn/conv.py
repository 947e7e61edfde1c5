"""The input padding that ``nn.Conv1d`` / ``nn.Conv2d`` apply themselves, shared by the masked and
the sparse convolutions.

The C++ conv kernels take only zero padding given as numbers. ``nn.Conv*d`` also accepts the
'reflect', 'replicate' and 'circular' padding modes and string padding ('same', 'valid'); for those
it pads the input first (``F.pad``) and convolves with padding 0. The masked and sparse layers must
compute exactly what the plain layer computes, so they pad the same way, here, in one place.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv_input_and_padding"]


def conv_input_and_padding(conv: nn.Module, x: Tensor) -> Tuple[Tensor, Union[int, Tuple[int, ...]]]:
    """``(input, padding)`` for the kernel: the input padded as ``conv`` would pad it for non-'zeros'
    modes and string padding (then padding 0), else ``x`` unchanged with ``conv.padding``."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        return x, 0
    return x, conv.padding
