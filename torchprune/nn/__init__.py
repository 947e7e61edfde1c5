"""tp.nn: the layers torchprune puts in place of pruned ones.

* masked.py: ``MaskedLinear``, ``MaskedConv1d``, ``MaskedConv2d`` (what ``tp.prune`` turns a layer
  into: the dense weight plus a bool mask, run by the C++ masked ops), ``get_mask`` and the
  optimizer hook that keeps pruned weights at zero;
* sparse.py: ``SparseLinear``, ``SparseConv2d`` (what ``tp.sparsify`` swaps in: only the kept
  weights, in CSR form, run by the C++ sparse kernels);
* attention.py: ``PrunedMultiheadAttention`` (what head pruning leaves of an
  ``nn.MultiheadAttention``);
* conv.py: the input padding the masked and sparse convolutions share.

>>> layer = tp.nn.SparseLinear.from_dense(model.fc)   # model.fc pruned with tp.prune
"""

from .masked import MaskedConv1d, MaskedConv2d, MaskedLinear
from .sparse import SparseConv2d, SparseLinear

__all__ = ["SparseLinear", "SparseConv2d", "MaskedLinear", "MaskedConv1d", "MaskedConv2d"]
