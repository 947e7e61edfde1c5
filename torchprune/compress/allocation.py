"""``--attention-offset D``: the attention projections of a transformer at ``--sparsity`` + D, the
other pruned layers at the sparsity that keeps the mean over all of them at ``--sparsity``.

Why: on all-MiniLM-L6-v2 at a mean of 90%, after the same 300 recovery steps from SparseGPT, the
attention projections at 80% and the feed-forward layers at 95% gave a mean embedding cosine of
0.809 against 0.786 for 90% everywhere (one-shot, before recovery, the two were alike: 0.426 and
0.419). Recovery cannot bring back attention patterns that a nine-in-ten cut of the query and key
projections destroyed; the 4x wider feed-forward layers have weights to spare. The choice stays the
user's (the default is the same sparsity everywhere): the best split was measured on one model.
An offset rather than a sparsity, so that one option serves a sweep over several ``--sparsity``.

A layer is an attention projection when a part of its name ends with ``attention`` or ``attn``, in
any case: BERT's ``attention``, GPT-2's ``attn``, LLaMA's and BART's ``self_attn`` and
``encoder_attn``, T5's ``SelfAttention`` and ``EncDecAttention``.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable

from torch import nn

from ..targets import target_layers

__all__ = ["ATTENTION", "is_attention", "attention_plan"]

#: a name part that marks a module as (part of) an attention block
ATTENTION = re.compile(r"\w*(attention|attn)", re.IGNORECASE)


def is_attention(name: str) -> bool:
    """True when a part of the dotted module name ``name`` names an attention module."""
    return any(ATTENTION.fullmatch(part) for part in name.split("."))


def attention_plan(model: nn.Module, sparsity: float, attention: float, exclude: Iterable = ()) -> Dict[str, float]:
    """A ``scope`` dict for `tp.prune`: ``attention`` for every attention projection, and for every
    other layer `tp.prune` would prune the sparsity that makes the weight-weighted mean ``sparsity``.
    SystemExit naming ``--attention-offset`` when either sparsity falls outside [0, 1), or the model
    has no attention projection or nothing else to prune."""
    if not 0 <= attention < 1:
        raise SystemExit(f"--attention-offset: the attention projections would be at {attention:.3f} with --sparsity "
                         f"{sparsity}; the offset must leave them in [0, 1)")
    layers, _ = target_layers(model, exclude, "layer")
    inside = {name: layer.weight.numel() for name, layer in layers.items() if is_attention(name)}
    outside = {name: layer.weight.numel() for name, layer in layers.items() if name not in inside}
    if not inside:
        raise SystemExit(f"--attention-offset: no prunable layer of the model is inside an attention module "
                         f"(a name part matching {ATTENTION.pattern!r}); prunable layers: {list(layers)[:8]}")
    if not outside:
        raise SystemExit("--attention-offset: every prunable layer is an attention projection; give --sparsity alone")
    total, share = sum(inside.values()) + sum(outside.values()), sum(inside.values())
    other = (sparsity * total - attention * share) / (total - share)
    if not 0 <= other < 1:
        raise SystemExit(f"--attention-offset: attention projections at {attention:.3f} with --sparsity {sparsity} "
                         f"would need the other layers at {other:.3f} (the attention projections hold "
                         f"{share / total:.1%} of the weights); choose an offset that leaves them in [0, 1)")
    return {name: (attention if name in inside else other) for name in layers}
