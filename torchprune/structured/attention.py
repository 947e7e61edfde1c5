"""An alias kept for pickles: models pickled by torchprune 0.3 name PrunedMultiheadAttention by this
path. The class lives in torchprune/nn/attention.py."""

from ..nn.attention import PrunedMultiheadAttention

__all__ = ["PrunedMultiheadAttention"]
