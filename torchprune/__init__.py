"""torchprune: neural-network pruning for PyTorch, with C++ kernels that turn sparsity into speed.

>>> import torchprune as tp
>>> tp.prune(model, sparsity=0.9, scope="global")
>>> print(tp.summary(model))
"""

from . import importance, nn, regularize, schedules
from ._version import __version__
from .analysis import sparsity, summary
from .analysis.auto import AutoPlan, auto
from .calibration import Inputs
from .io import load, save
from .masking import make_permanent, masks
from .oneshot import prune
from .pruner import Pruner
from .recovery import recalibrate_bn, recover
from .regrowth import Regrow

# importing from the module torchprune.sensitivity loads it now, so that the function bound here hides
# it for good (a later `import torchprune.sensitivity` would otherwise rebind tp.sensitivity)
from .sensitivity import allocate, sensitivity  # noqa: I001
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
    "Inputs",
    "recover",
    "recalibrate_bn",
    "Regrow",
    "auto",
    "AutoPlan",
]
