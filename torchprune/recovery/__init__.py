"""Recovery after pruning: distillation from the dense model, BatchNorm recalibration, and the
text that ships with Python to run them on without a download.

* `recover` (loop.py): trains the pruned student to give the dense teacher's outputs, optionally
  while a `tp.Pruner` raises its sparsity; checkpoints and resumes.
* `distillation_loss` (losses.py): the cosine, MSE, KL and sentence-embedding losses it uses.
* `recalibrate_bn` (batchnorm.py): fresh BatchNorm running statistics after pruning.
* text.py: sentences of the Python reference and of the standard library's docstrings.
"""

from .batchnorm import recalibrate_bn
from .loop import Recovery, recover
from .losses import KINDS, distillation_loss, output_tensor, token_mask

__all__ = ["recover", "Recovery", "recalibrate_bn", "distillation_loss", "output_tensor", "token_mask", "KINDS"]
