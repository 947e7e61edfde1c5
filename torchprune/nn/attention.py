"""PrunedMultiheadAttention: nn.MultiheadAttention with heads, per-head dims or width removed.

nn.MultiheadAttention requires num_heads * head_dim == embed_dim (the width of its inputs and
outputs), so it cannot hold fewer heads, or narrower heads, than the residual stream is wide. This
module keeps the same call signature, arguments and outputs (attention weights included), with its
own ``num_heads``, ``head_dim`` (q and k features per head) and ``v_head_dim`` (v features per
head): the packed ``in_proj_weight`` holds [q | k | v] rows, ``num_heads * head_dim`` each for q
and k and ``num_heads * v_head_dim`` for v, and ``out_proj`` maps the heads' v features back to
``embed_dim``. ``scale`` is the original 1/sqrt(head_dim), kept when head_dim shrinks, so that
removing a head, a q/k position of every head or a v position of every head is exact: the result
equals the original module with those q, k, v rows (and out_proj columns, for v) zeroed.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention whose inner widths ``num_heads * head_dim`` (q, k) and
    ``num_heads * v_head_dim`` (v) may differ from ``embed_dim``."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False, v_head_dim: Optional[int] = None, scale: Optional[float] = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.embed_dim, self.num_heads, self.head_dim, self.v_head_dim = embed_dim, num_heads, head_dim, v_head_dim
        self.scale = 1 / math.sqrt(head_dim) if scale is None else float(scale)
        self.dropout, self.batch_first = dropout, batch_first
        rows = num_heads * (2 * head_dim + v_head_dim)
        self.in_proj_weight = nn.Parameter(torch.empty(rows, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.zeros(rows, **factory)) if bias else None
        self.out_proj = nn.Linear(num_heads * v_head_dim, embed_dim, bias=bias, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def __setstate__(self, state):
        # modules pickled before v_head_dim and scale existed
        super().__setstate__(state)
        self.__dict__.setdefault("v_head_dim", self.head_dim)
        self.__dict__.setdefault("scale", 1 / math.sqrt(self.head_dim))

    @staticmethod
    def head_rows(mha, heads: Tensor) -> Tuple[Tensor, Tensor]:
        """The in_proj rows (q, k and v) and the out_proj columns of ``heads`` of ``mha`` (an
        nn.MultiheadAttention or a PrunedMultiheadAttention)."""
        h, hd, vhd = mha.num_heads, mha.head_dim, getattr(mha, "v_head_dim", mha.head_dim)
        qk = (heads[:, None] * hd + torch.arange(hd)).flatten()
        v = (heads[:, None] * vhd + torch.arange(vhd)).flatten()
        return torch.cat([qk, qk + h * hd, v + 2 * h * hd]), v

    @classmethod
    def from_attention(cls, mha: nn.Module, keep_heads: Tensor) -> "PrunedMultiheadAttention":
        """The heads ``keep_heads`` (indices) of ``mha`` (an nn.MultiheadAttention or a
        PrunedMultiheadAttention), weights copied."""
        rows, columns = cls.head_rows(mha, keep_heads)
        # no random init: every tensor is overwritten below
        new = torch.nn.utils.skip_init(
            cls, mha.embed_dim, len(keep_heads), mha.head_dim, mha.in_proj_bias is not None, mha.dropout,
            mha.batch_first, getattr(mha, "v_head_dim", mha.head_dim),
            getattr(mha, "scale", 1 / math.sqrt(mha.head_dim)),
            device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight[rows])
            if mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias[rows])
            new.out_proj.weight.copy_(mha.out_proj.weight[:, columns])
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def sync_sizes(self) -> None:
        """Sets embed_dim, head_dim and v_head_dim from the (sliced) tensors."""
        self.embed_dim = self.in_proj_weight.shape[1]
        self.v_head_dim = self.out_proj.weight.shape[1] // self.num_heads
        self.head_dim = (self.in_proj_weight.shape[0] - self.num_heads * self.v_head_dim) // (2 * self.num_heads)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, N, _ = query.shape
        S = key.shape[0]
        H, hd, vhd = self.num_heads, self.head_dim, self.v_head_dim
        qk = H * hd
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:qk], None if b is None else b[:qk])
        k = F.linear(key, w[qk : 2 * qk], None if b is None else b[qk : 2 * qk])
        v = F.linear(value, w[2 * qk :], None if b is None else b[2 * qk :])
        q = q.reshape(L, N * H, hd).transpose(0, 1)
        k = k.reshape(S, N * H, hd).transpose(0, 1)
        v = v.reshape(S, N * H, vhd).transpose(0, 1)
        scores = (q @ k.transpose(1, 2)) * self.scale  # (N*H, L, S)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask.view(N, 1, 1, S).expand(N, H, 1, S).reshape(N * H, 1, S)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        attn = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = (attn @ v).transpose(0, 1).reshape(L, N, H * vhd)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = attn.view(N, H, L, S)
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights

    def extra_repr(self) -> str:
        v = "" if self.v_head_dim == self.head_dim else f", v_head_dim={self.v_head_dim}"
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}{v}, "
                f"batch_first={self.batch_first}")
