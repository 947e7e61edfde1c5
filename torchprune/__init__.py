"""torchprune: neural-network pruning for PyTorch, with C++ kernels that turn sparsity into speed.

>>> import torchprune as tp
>>> tp.prune(model, sparsity=0.9, scope="global")
>>> print(tp.summary(model))
"""

from . import importance, nn, regularize, schedules
from ._version import __version__
from .analysis import sparsity, summary
from .analysis.sensitivity import allocate, sensitivity
from .io import load, save
from .masking import make_permanent, masks
from .oneshot import prune
from .pruner import Pruner
from .sparsify import sparsify
from .structured import DependencyGraph

__all__ = [
    "__version__",
    "importance",
    "prune",
    "masks",
    "sparsity",
    "make_permanent",
    "save",
    "load",
    "summary",
    "nn",
    "sparsify",
    "DependencyGraph",
    "Pruner",
    "schedules",
    "regularize",
    "sensitivity",
    "allocate",
]
