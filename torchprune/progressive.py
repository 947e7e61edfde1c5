"""An alias kept for pickles: a model pickled by torchprune 0.3 while a weight `Pruner` observed its
forward passes (data-driven criteria without ``data``) carries that Pruner's forward hook under this
module's path. The hook unpickles as an inert one (it observes nothing, as any copied hook does).
`tp.Pruner` lives in torchprune/pruner.py."""

from .pruner import ObservationHook as _ObservationHook  # noqa: F401  (the name 0.3 pickles carry)
from .pruner import Pruner

__all__ = ["Pruner"]
