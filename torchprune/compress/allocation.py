"""Per-layer sparsities around a mean, for the compress command's ``--attention-offset D`` and
``--offset PATTERN=D``: the chosen layers at ``--sparsity`` + D, every other pruned layer at the
sparsity that keeps the weight-weighted mean over all of them at ``--sparsity``.

Why: on all-MiniLM-L6-v2 at a mean of 90%, after the same 300 recovery steps from SparseGPT, the
attention projections at 80% and the feed-forward layers at 95% gave a mean embedding cosine of
0.809 against 0.786 for 90% everywhere (one-shot, before recovery, the two were alike: 0.426 and
0.419). Inside attention the four projections are not alike either: at a mean of 80% (300 steps),
query and key at 80% with value and output at 60% gave 0.902, the reverse 0.873, all four at 70%
0.894; at 90%, query and key at 90% with value and output at 70% gave 0.832 against 0.812 for all
four at 80%. The query and key projections only shape the attention pattern, through a softmax that
forgives a coarse score; value and output carry what every token passes on. ``--offset`` says such
a split for any layers by name. The choice stays the user's (the default is the same sparsity
everywhere): the best split was measured on one model. Offsets rather than sparsities, so that one
option serves a sweep over several ``--sparsity``.

A layer is an attention projection when a part of its name ends with ``attention`` or ``attn``, in
any case: BERT's ``attention``, GPT-2's ``attn``, LLaMA's and BART's ``self_attn`` and
``encoder_attn``, T5's ``SelfAttention`` and ``EncDecAttention``.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

from torch import nn

from ..targets import target_layers

__all__ = ["ATTENTION", "is_attention", "attention_plan", "offset_plan"]

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
    if not any(is_attention(name) for name in layers):
        raise SystemExit(f"--attention-offset: no prunable layer of the model is inside an attention module "
                         f"(a name part matching {ATTENTION.pattern!r}); prunable layers: {list(layers)[:8]}")
    return _around_mean(layers, sparsity, lambda name: attention if is_attention(name) else None,
                        "--attention-offset", "every prunable layer is an attention projection; give --sparsity alone",
                        f"attention projections at {attention:.3f} with --sparsity {sparsity} would need",
                        "the attention projections hold", "choose an offset")


def offset_plan(model: nn.Module, sparsity: float, offsets: Sequence[Tuple[str, float]],
                exclude: Iterable = ()) -> Dict[str, float]:
    """A ``scope`` dict for `tp.prune`: each layer `tp.prune` would prune whose dotted name the
    regular expression of one of ``offsets`` finds (``re.search``; the first that does) at ``sparsity``
    plus that offset, every other one at the sparsity that makes the weight-weighted mean ``sparsity``.
    SystemExit naming ``--offset`` when a pattern finds no prunable layer or only layers an earlier
    pattern took, a sparsity falls outside [0, 1), or every layer is matched (nothing would be left
    to keep the mean)."""
    layers, _ = target_layers(model, exclude, "layer")
    rules = [(re.compile(pattern), pattern, sparsity + offset) for pattern, offset in offsets]
    for compiled, pattern, value in rules:
        if not any(compiled.search(name) for name in layers):
            raise SystemExit(f"--offset: {pattern!r} finds no prunable layer; prunable layers: {list(layers)[:8]}")
        if not 0 <= value < 1:
            raise SystemExit(f"--offset: the layers {pattern!r} finds would be at {value:.3f} with --sparsity "
                             f"{sparsity}; the offset must leave them in [0, 1)")

    def first(name: str) -> Optional[int]:
        return next((i for i, (compiled, _, _) in enumerate(rules) if compiled.search(name)), None)

    taken = {first(name) for name in layers}
    for i, (_, pattern, _) in enumerate(rules):
        if i not in taken:
            raise SystemExit(f"--offset: every layer {pattern!r} finds is taken by an earlier pattern (the first "
                             "pattern that finds a layer sets its sparsity)")

    def matched(name: str) -> Optional[float]:
        i = first(name)
        return None if i is None else rules[i][2]

    return _around_mean(layers, sparsity, matched, "--offset",
                        "every prunable layer matches a pattern; leave some to keep the mean at --sparsity",
                        f"the offsets with --sparsity {sparsity} would need", "the matched layers hold",
                        "choose offsets")


def _around_mean(layers: Dict[str, nn.Module], sparsity: float, matched: Callable[[str], Optional[float]],
                 option: str, all_matched: str, need: str, share_of: str, choose: str) -> Dict[str, float]:
    """The plan: ``matched(name)`` where it is not None, the mean-keeping sparsity elsewhere; SystemExit
    (``option``: ...) when nothing is left unmatched or that sparsity falls outside [0, 1)."""
    chosen = {name: matched(name) for name in layers}
    sizes = {name: layer.weight.numel() for name, layer in layers.items()}
    rest = [name for name in layers if chosen[name] is None]
    if not rest:
        raise SystemExit(f"{option}: {all_matched}")
    total, left = sum(sizes.values()), sum(sizes[name] for name in rest)
    other = (sparsity * total - sum(chosen[n] * sizes[n] for n in layers if chosen[n] is not None)) / left
    if not 0 <= other < 1:
        raise SystemExit(f"{option}: {need} the other layers at {other:.3f} ({share_of} {1 - left / total:.1%} of "
                         f"the weights); {choose} that leave them in [0, 1)")
    return {name: (other if chosen[name] is None else chosen[name]) for name in layers}
