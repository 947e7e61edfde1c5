"""PrunedMultiheadAttention: nn.MultiheadAttention with some heads removed.

nn.MultiheadAttention requires num_heads * head_dim == embed_dim (the width of its inputs), so it
cannot hold fewer heads than the residual stream is wide. This module keeps the same call
signature, arguments and outputs (attention weights included), with its own ``num_heads`` and
``head_dim``: q, k, v are projected to ``num_heads * head_dim`` features and ``out_proj`` maps them
back to ``embed_dim``. Removing a head is exact: the result equals the original module with the
head's q, k, v rows and out_proj columns zeroed (the scale 1/sqrt(head_dim) does not change).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention whose inner width ``num_heads * head_dim`` may differ from ``embed_dim``."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_attention(cls, mha: nn.MultiheadAttention, keep_heads: Tensor) -> "PrunedMultiheadAttention":
        """The heads ``keep_heads`` (indices) of ``mha``, weights copied."""
        hd = mha.head_dim
        rows = (keep_heads[:, None] * hd + torch.arange(hd)).flatten()
        inner_rows = torch.cat([rows + part * mha.num_heads * hd for part in range(3)])
        new = cls(mha.embed_dim, len(keep_heads), hd, mha.in_proj_bias is not None, mha.dropout, mha.batch_first)
        new = new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight[inner_rows])
            if mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias[inner_rows])
            new.out_proj.weight.copy_(mha.out_proj.weight[:, rows])
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

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
        inner, H, hd = self.num_heads * self.head_dim, self.num_heads, self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:inner], None if b is None else b[:inner])
        k = F.linear(key, w[inner : 2 * inner], None if b is None else b[inner : 2 * inner])
        v = F.linear(value, w[2 * inner :], None if b is None else b[2 * inner :])
        q = q.reshape(L, N * H, hd).transpose(0, 1)
        k = k.reshape(S, N * H, hd).transpose(0, 1)
        v = v.reshape(S, N * H, hd).transpose(0, 1)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)  # (N*H, L, S)
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
        out = (attn @ v).transpose(0, 1).reshape(L, N, inner)
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
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, batch_first={self.batch_first}"
