"""Structured pruning: whole channels, attention heads and residual blocks removed physically.

* graph.py (with tracing/): `DependencyGraph`, the coupled channel groups, from one recorded run
  on the example inputs or, where a layer does not run on them, from torch.fx's symbolic trace;
  what each layer type couples, slices and scores is in torchprune/layer_types.py;
* scoring.py: group importance; select.py: which units go; channels.py: `prune_channels`;
* exclusion.py: what ``exclude`` and ``freeze`` keep (channel groups, heads, blocks);
* plan.py: the removal plan (its format, recorded on the model) and slicing every member through
  the C++ ``compact`` op (torchprune/ops/compact.py);
* heads.py (with torchprune/nn/attention.py): attention heads, and `register_attention` for a
  hand-written attention class named otherwise than timm's; head_dims.py: its head size in channel
  pruning; blocks.py and stacks.py: residual blocks and transformer layers; replay.py: `tp.load`;
* granularity.py: `prune_structural`, the structural branch of `tp.prune`.

`tp.prune(model, sparsity, granularity="channel" | "head" | "layer", example_inputs=...)` is the
entry point (with "channel", ``round_to=k`` keeps a multiple of k channels per group).
"""

from ..nn.attention import PrunedMultiheadAttention
from .channels import prune_channels
from .granularity import prune_structural
from .graph import DependencyGraph, Group
from .heads import AttentionNames, register_attention

__all__ = ["AttentionNames", "DependencyGraph", "Group", "PrunedMultiheadAttention", "prune_channels",
           "prune_structural", "register_attention"]
