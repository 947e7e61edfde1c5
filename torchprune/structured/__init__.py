"""Structured pruning: whole channels, attention heads and residual blocks removed physically.

* graph.py (with trace.py, record.py, dispatch.py, rules.py, labels.py): `DependencyGraph`, the
  coupled channel groups, from one recorded run on the example inputs or, where a layer does not
  run on them, from torch.fx's symbolic trace;
* scoring.py: group importance; prune.py: selection and `prune_channels`;
* remove.py: slicing every member through the C++ ``compact`` op (torchprune/ops/compact.py);
* heads.py + attention.py: attention heads; layers.py: residual blocks; replay.py: `tp.load`.

`tp.prune(model, sparsity, granularity="channel" | "head" | "layer", example_inputs=...)` is the
entry point (with "channel", ``round_to=k`` keeps a multiple of k channels per group).
"""

from .attention import PrunedMultiheadAttention
from .graph import DependencyGraph, Group
from .prune import prune_channels

__all__ = ["DependencyGraph", "Group", "PrunedMultiheadAttention", "prune_channels"]
