"""How error messages name a value they refuse: one wording for every module.

An argument check says what it wanted and what it got ("`example_inputs` must be a Tensor or a
tuple/list of Tensors, got list of (Tensor, int)"); `describe` writes the "what it got" part, so
that the same value reads the same in every message.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["describe"]


def describe(value: Any) -> str:
    """A short description of ``value`` for an error message.

    >>> describe(torch.zeros(2, 3))
    'a 2-D tensor of shape [2, 3]'
    >>> describe((torch.zeros(1), 3))
    'tuple of (Tensor, int)'
    """
    if value is None:
        return "nothing"
    if isinstance(value, Tensor):
        return f"a {value.dim()}-D tensor of shape {list(value.shape)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value)
        return f"{type(value).__name__} of ({inner})"
    return type(value).__name__
