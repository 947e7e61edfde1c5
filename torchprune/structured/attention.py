"""Moved to torchprune.nn.attention (old pickles of PrunedMultiheadAttention name this path: keep an alias)."""
from ..nn.attention import PrunedMultiheadAttention  # noqa: F401  # shim: removed at integration
