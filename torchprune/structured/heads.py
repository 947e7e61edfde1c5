"""prune(..., granularity="head"): remove whole attention heads.

These kinds of attention are handled:

* ``nn.MultiheadAttention`` (packed q/k/v projection, no bias_k/bias_v, no add_zero_attn) and our
  own `PrunedMultiheadAttention`: the module is replaced by a `PrunedMultiheadAttention` holding
  the kept heads (nn.MultiheadAttention cannot have fewer heads than its input is wide);
* hand-written attention that follows the timm convention: a module with int attributes
  ``num_heads`` and ``head_dim``, a fused ``qkv`` Linear with 3 * num_heads * head_dim outputs laid
  out [q | k | v] and heads contiguous within each, and a ``proj`` Linear reading
  num_heads * head_dim features. Its forward must shape tensors from ``self.num_heads`` /
  ``self.head_dim``; that is verified on the example inputs before anything is changed (removing
  the heads must give the outputs of zeroing them), and a module that fails is left as it is and
  named in a warning;
* transformers' attention with separate projections (``q_proj``/``k_proj``/``v_proj`` and ``o_proj``
  or ``out_proj``, an int ``head_dim``): LLaMA, Mistral and Qwen2 with ``num_key_value_groups``
  query heads per key/value head (grouped-query attention: the unit is a key/value head with its
  group of query heads, so the groups stay whole), ViT and BART with one (the unit is a head);
* transformers' BERT-family attention block (``self.query``/``key``/``value`` with
  ``num_attention_heads`` and ``attention_head_size``, ``output.dense``): the unit is a head;
* transformers' GPT-2 attention: one Conv1D ``c_attn`` making [q | k | v], ``split_size`` wide
  each, and a Conv1D ``c_proj`` (Conv1D stores its weight (in, out): the layer-type table says
  which dims are outputs); the unit is a head;
* transformers' T5 attention (``q``/``k``/``v``/``o``, ``n_heads`` heads of ``key_value_proj_dim``):
  the unit is a head. A stack's first layer computes a relative-position bias with one row per head
  (its ``relative_attention_bias`` Embedding has one column per head) and passes it to every later
  layer, so the layers of a stack are *tied*: they lose the same heads, chosen by their joint score
  (`tied_heads`), and the Embedding loses those columns.
  The transformers layouts are verified like hand-written attention, their head-count attributes
  (``num_heads``, ``num_attention_heads``, ``all_head_size``, ``split_size``, ...) are rewritten,
  and hf_config.py then rewrites the model's config where it can say the new counts.

A head's score is the mean over its four slices (q, k, v rows and out-projection columns) of the
slice's sum of |w|^p divided by that member's mean over heads; "random" is also accepted. Heads
are chosen by the channels' selection (select.py): with ``scope="layer"`` a module of n heads
keeps floor((1 - sparsity) * n), at least one.

``exclude`` and ``freeze`` follow the channels' rule (exclusion.py) with a head's members: its
q/k/v rows are outputs of the q/k/v projection and the out-projection's columns reading it are
inputs. So excluding the attention module or its ``qkv`` keeps its heads; excluding only its
out-projection (``proj``, ``out_proj``) keeps that Linear's outputs (the model width, which heads
do not change) and its heads may still go; freezing any of them keeps the heads.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..calibration import as_inputs
from ..importance import FilterNorm, Magnitude, Random, resolve
from ..layer_types import lookup, resize
from ..nn.attention import PrunedMultiheadAttention
from ..ops import compact
from ..targets import check_scope
from .exclusion import Exclusion
from .hf_config import sync_config
from .plan import record_step
from .select import select
from .tracing.recorder import Member

__all__ = ["AttentionNames", "attention_modules", "attention_names", "first_tensor", "hand_written", "head_members",
           "heads_and_size", "normalized_mean", "projection_names", "prune_heads", "qkv_and_proj", "register_attention",
           "remove_heads", "set_heads_and_size", "slice_layer", "tied_heads", "units"]


def _packed(module) -> bool:
    if isinstance(module, PrunedMultiheadAttention):
        return True
    return (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim and module.bias_k is None
            and not module.add_zero_attn)


@dataclass(frozen=True)
class AttentionNames:
    """How a hand-written attention class names its parts: the fused q/k/v Linear, the output
    Linear, the int head count and head size, the int attributes that hold heads x head size
    (rewritten when either changes) and the float softmax scale (rewritten with the head size).
    timm's names are the default."""

    qkv: str = "qkv"
    proj: str = "proj"
    num_heads: str = "num_heads"
    head_dim: str = "head_dim"
    widths: Tuple[str, ...] = ("attn_dim",)
    scale: str = "scale"


_TIMM = AttentionNames()
_DECLARED: Dict[type, AttentionNames] = {}


def register_attention(cls: type, *, qkv: str = "qkv", proj: str = "proj", num_heads: str = "num_heads",
                       head_dim: str = "head_dim", widths: Sequence[str] = ("attn_dim",),
                       scale: str = "scale") -> AttentionNames:
    """Declares a hand-written attention class whose parts are named otherwise than timm's, so that
    granularity "head" removes its heads and "channel" shrinks its head size (head_dims.py), with
    its attributes rewritten. Its forward must shape q, k, v from these attributes; every module is
    still checked against zeroing on the example inputs before it changes. Returns the names.

    >>> register_attention(MyAttention, qkv="to_qkv", proj="to_out", num_heads="heads", head_dim="dim_head",
    ...                    widths=("inner_dim",))
    >>> tp.prune(model, 0.5, granularity="head", example_inputs=x)
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"`cls` must be a subclass of torch.nn.Module, got {cls!r}")
    fields = {"qkv": qkv, "proj": proj, "num_heads": num_heads, "head_dim": head_dim, "scale": scale}
    for argument, value in fields.items():
        if not isinstance(value, str) or not value.isidentifier():
            raise TypeError(f"`{argument}` must be an attribute name (a str), got {value!r}")
    if isinstance(widths, str) or any(not isinstance(w, str) or not w.isidentifier() for w in widths):
        raise TypeError(f"`widths` must be a sequence of attribute names, got {widths!r}")
    names = AttentionNames(widths=tuple(widths), **fields)
    _DECLARED[cls] = names
    return names


def attention_names(module: nn.Module) -> AttentionNames:
    """The names `register_attention` declared for ``module``'s class (or a base class), else timm's."""
    return next((_DECLARED[k] for k in type(module).__mro__ if k in _DECLARED), _TIMM)


def hand_written(module) -> bool:
    """A hand-written attention layout (timm's names, or those `register_attention` declared): an int
    head count and head size, a fused q/k/v Linear making [q | k | v] and an output Linear reading
    the heads."""
    a = attention_names(module)
    qkv, proj = getattr(module, a.qkv, None), getattr(module, a.proj, None)
    h, hd = getattr(module, a.num_heads, None), getattr(module, a.head_dim, None)
    return (isinstance(h, int) and isinstance(hd, int) and isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
            and qkv.out_features == 3 * h * hd and proj.in_features == h * hd)


def heads_and_size(module) -> Tuple[int, int]:
    """(head count, head size) of a packed or hand-written attention module."""
    if _packed(module):
        return module.num_heads, module.head_dim
    a = attention_names(module)
    return getattr(module, a.num_heads), getattr(module, a.head_dim)


def set_heads_and_size(module, heads: int, size: int) -> None:
    """Rewrites a hand-written module's head count, head size and the attributes that hold their
    product (those equal to the old product)."""
    a = attention_names(module)
    old = getattr(module, a.num_heads) * getattr(module, a.head_dim)
    setattr(module, a.num_heads, heads)
    setattr(module, a.head_dim, size)
    for width in a.widths:
        if getattr(module, width, None) == old:
            setattr(module, width, heads * size)


def projection_names(module) -> Tuple[str, str]:
    """The attribute names of a hand-written module's q/k/v and output Linears."""
    a = attention_names(module)
    return a.qkv, a.proj


def qkv_and_proj(module) -> Tuple[nn.Linear, nn.Linear]:
    """(fused q/k/v Linear, output Linear) of a hand-written attention module."""
    qkv, proj = projection_names(module)
    return getattr(module, qkv), getattr(module, proj)


def _linears(module, names) -> List[nn.Module]:
    """The submodules ``names`` of ``module`` if each is a Linear or a transposed one (transformers'
    Conv1D, weight stored (in, out)), else []."""
    found = [getattr(module, n, None) for n in names]
    return found if all(_projection(t) for t in found) else []


def _projection(module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and _is_conv1d(module))


def _is_conv1d(module: nn.Module) -> bool:
    entry = lookup(type(module))
    return (entry is not None and entry.output_member == ("weight", 1) and isinstance(getattr(module, "nf", None), int)
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2)


def _outputs(module) -> int:
    return module.nf if _is_conv1d(module) else module.out_features


def _inputs(module) -> int:
    return module.weight.shape[0] if _is_conv1d(module) else module.in_features


#: transformers' names of separate q/k/v/output projections: LLaMA, Mistral, Qwen2, ViT (o_proj);
#: BART and its relatives (out_proj).
_SEPARATE = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"))


def _separate_projections(module) -> List[nn.Module]:
    return next((found for found in (_linears(module, names) for names in _SEPARATE) if found), [])


def _grouped_query(module) -> bool:
    """transformers' attention with separate q/k/v/o projections and an int ``head_dim``: LLaMA,
    Mistral, Qwen2 (``num_key_value_groups`` query heads per key/value head: grouped-query
    attention), ViT and BART (one key/value head per query head)."""
    projections = _separate_projections(module)
    hd, rep = getattr(module, "head_dim", None), getattr(module, "num_key_value_groups", 1)
    if not projections or not isinstance(hd, int) or not isinstance(rep, int) or hd < 1 or rep < 1:
        return False
    q, k, v, o = projections
    return (_outputs(k) == _outputs(v) and _outputs(k) % hd == 0
            and _outputs(q) == _outputs(k) * rep == _inputs(o))


def _separate_qkv(module) -> bool:
    """transformers' BERT-family attention block: ``self`` with query/key/value Linears,
    ``num_attention_heads`` and ``attention_head_size``, and ``output.dense`` reading them."""
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    projections = _linears(inner, ("query", "key", "value")) if inner is not None else []
    dense = getattr(output, "dense", None)
    h, hd = getattr(inner, "num_attention_heads", None), getattr(inner, "attention_head_size", None)
    return (bool(projections) and isinstance(dense, nn.Linear) and isinstance(h, int) and isinstance(hd, int)
            and all(t.out_features == h * hd for t in projections) and dense.in_features == h * hd)


def _fused_conv1d(module) -> bool:
    """transformers' GPT-2 self-attention: one Conv1D ``c_attn`` making [q | k | v] (each
    ``split_size`` = num_heads * head_dim wide) and a Conv1D ``c_proj`` reading the heads."""
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    h, hd, split = (getattr(module, n, None) for n in ("num_heads", "head_dim", "split_size"))
    return (all(isinstance(t, int) and t > 0 for t in (h, hd, split)) and split == h * hd
            and not getattr(module, "is_cross_attention", False)
            and all(isinstance(t, nn.Module) and _is_conv1d(t) for t in (c_attn, c_proj))
            and c_attn.nf == 3 * split and _inputs(c_proj) == split)


def _t5(module) -> bool:
    """transformers' T5 attention: q/k/v/o Linears, ``n_heads`` heads of ``key_value_proj_dim``
    and, in a stack's first layer, a ``relative_attention_bias`` Embedding with a column per head."""
    projections = _linears(module, ("q", "k", "v", "o"))
    h, hd = getattr(module, "n_heads", None), getattr(module, "key_value_proj_dim", None)
    if not projections or not isinstance(h, int) or not isinstance(hd, int) or h < 1 or hd < 1:
        return False
    bias = getattr(module, "relative_attention_bias", None)
    return (all(_outputs(t) == h * hd for t in projections[:3]) and _inputs(projections[3]) == h * hd
            and (bias is None or (isinstance(bias, nn.Embedding) and bias.embedding_dim == h)))


def _transformers_layout(module) -> bool:
    return _grouped_query(module) or _separate_qkv(module) or _fused_conv1d(module) or _t5(module)


def tied_heads(modules: Dict[str, nn.Module]) -> List[List[str]]:
    """The attention modules (by name) that must lose the same heads, in groups, each module once:
    T5's layers of one stack, which add the first layer's per-head position bias (by name: the
    ``block.N`` index is what differs), and every other module alone."""
    ties: Dict[object, List[str]] = {}
    for name, module in modules.items():
        key = (re.sub(r"(^|\.)block\.\d+\.", r"\1block.*.", name), units(module)) if _t5(module) else name
        ties.setdefault(key, []).append(name)
    return list(ties.values())


def _split_layout(module):
    """For the transformers layouts: [(projection, first row, rows per unit)] of the blocks of
    output features that make the units, (projection, columns per unit) of the one that reads them,
    and the unit count. A unit is a head, or a key/value head with its group of query heads
    (grouped-query attention), so groups stay whole and ``num_key_value_groups`` stays valid."""
    if _grouped_query(module):
        q, k, v, o = _separate_projections(module)
        hd, rep = module.head_dim, getattr(module, "num_key_value_groups", 1)
        return [(q, 0, hd * rep), (k, 0, hd), (v, 0, hd)], (o, hd * rep), _outputs(k) // hd
    if _fused_conv1d(module):
        hd, split = module.head_dim, module.split_size
        return ([(module.c_attn, i * split, hd) for i in range(3)], (module.c_proj, hd), module.num_heads)
    if _t5(module):
        hd = module.key_value_proj_dim
        return [(module.q, 0, hd), (module.k, 0, hd), (module.v, 0, hd)], (module.o, hd), module.n_heads
    inner, hd = module.self, module.self.attention_head_size
    return ([(inner.query, 0, hd), (inner.key, 0, hd), (inner.value, 0, hd)], (module.output.dense, hd),
            inner.num_attention_heads)


def _as_rows(module) -> torch.Tensor:
    """A projection's weight as (outputs, inputs)."""
    return module.weight.detach().t() if _is_conv1d(module) else module.weight.detach()


#: Attributes of transformers' attention modules that hold a head count (query heads; BERT's on
#: its ``self``) or a product of heads and head size; they are rewritten after heads go.
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads")
_HEAD_WIDTHS = ("all_head_size", "split_size", "inner_dim")


def _rewrite_counts(owner: nn.Module, heads: int, new_heads: int, width: int, new_width: int) -> None:
    for name in _HEAD_COUNTS + _HEAD_WIDTHS:
        old, new = ((heads, new_heads) if name in _HEAD_COUNTS else (width, new_width))
        if isinstance(getattr(owner, name, None), int) and getattr(owner, name) == old:
            setattr(owner, name, new)


def _remove_transformers_heads(module, keep_t: torch.Tensor) -> None:
    projections, (out, c), n = _split_layout(module)
    owner = module.self if _separate_qkv(module) else module
    bias = getattr(module, "relative_attention_bias", None) if _t5(module) else None
    if bias is not None:  # T5: the position bias's column of each head (an Embedding's outputs)
        slice_layer(bias, "outputs", keep_t)
    heads_per_unit = projections[0][2] // projections[1][2]  # query heads per unit (grouped-query)
    width = _outputs(projections[0][0]) if not _fused_conv1d(module) else module.split_size
    rows: Dict[int, List[torch.Tensor]] = {}
    for linear, first, r in projections:
        rows.setdefault(id(linear), []).append(first + _rows(keep_t, r))
    for linear in {id(t): t for t, _, _ in projections}.values():
        slice_layer(linear, "outputs", torch.cat(rows[id(linear)]))
    slice_layer(out, "inputs", _rows(keep_t, c))
    _rewrite_counts(owner, n * heads_per_unit, len(keep_t) * heads_per_unit, width, width * len(keep_t) // n)
    if getattr(owner, "num_key_value_heads", None) == n:
        owner.num_key_value_heads = len(keep_t)


def units(module) -> int:
    """The heads (key/value heads with their query groups, for grouped-query attention) of an
    attention module ``attention_modules`` found."""
    return _split_layout(module)[2] if _transformers_layout(module) else heads_and_size(module)[0]


def attention_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if _packed(m) or hand_written(m) or _transformers_layout(m)}


def head_members(name: str, module: nn.Module) -> List[Member]:
    """The (module name, tensor, dim) members that lose a head's slices: the q/k/v rows and the
    out-projection's columns (what `exclude` and `freeze` are checked against)."""
    prefix = f"{name}." if name else ""
    if _packed(module):
        return [(name, "in_proj_weight", 0), (prefix + "out_proj", "weight", 1)]
    if _transformers_layout(module):
        projections, (out, _), _ = _split_layout(module)
        names = {id(m): n for n, m in module.named_modules()}
        makers = {id(t): t for t, _, _ in projections}.values()
        return ([(prefix + names[id(t)], "weight", int(_is_conv1d(t))) for t in makers]
                + [(prefix + names[id(out)], "weight", int(not _is_conv1d(out)))])
    a = attention_names(module)
    return [(prefix + a.qkv, "weight", 0), (prefix + a.proj, "weight", 1)]


def _slices(module):
    """(q, k, v row blocks, output projection) of the per-head members, and v's features per head."""
    h, hd = heads_and_size(module)
    vhd = getattr(module, "v_head_dim", hd) if _packed(module) else hd
    if _packed(module):
        w, out = module.in_proj_weight.detach(), module.out_proj.weight.detach()
    else:
        w, out = (t.weight.detach() for t in qkv_and_proj(module))
    return (w[: h * hd], w[h * hd : 2 * h * hd], w[2 * h * hd :]), out, vhd


def _head_scores(module, criterion) -> torch.Tensor:
    if _transformers_layout(module):
        projections, (out, c), n = _split_layout(module)
        p = float(getattr(criterion, "p", 1))
        parts = [_as_rows(t)[first:first + n * r].double().abs().pow(p).reshape(n, -1).sum(1)
                 for t, first, r in projections]
        parts.append(_as_rows(out).double().abs().pow(p).reshape(_outputs(out), n, c).sum((0, 2)))
        return normalized_mean(parts)
    h = heads_and_size(module)[0]
    (q, k, v), out, vhd = _slices(module)
    p = float(getattr(criterion, "p", 1))
    parts = [t.double().abs().pow(p).reshape(h, -1).sum(1) for t in (q, k, v)]
    parts.append(out.double().abs().pow(p).reshape(out.shape[0], h, vhd).sum((0, 2)))
    return normalized_mean(parts)


def normalized_mean(parts) -> torch.Tensor:
    """The mean of per-unit score vectors, each divided by its own mean first (an all-zero one as it
    is), so that members of different sizes weigh alike (as scoring.py does for channel groups)."""
    return sum(s / s.mean() if s.mean() > 0 else s for s in parts) / len(parts)


def _rows(keep: torch.Tensor, hd: int) -> torch.Tensor:
    return (keep[:, None] * hd + torch.arange(hd)).flatten()


def remove_heads(model: nn.Module, name: str, keep: List[int]) -> None:
    """Keeps only heads ``keep`` of the attention module ``name`` (in place in ``model``)."""
    module = model.get_submodule(name)
    keep_t = torch.as_tensor(keep, dtype=torch.int64)
    if _packed(module):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PrunedMultiheadAttention.from_attention(module, keep_t))
        return
    if _transformers_layout(module):
        _remove_transformers_heads(module, keep_t)
        return
    h, hd = heads_and_size(module)
    rows = _rows(keep_t, hd)
    qkv, proj = qkv_and_proj(module)
    slice_layer(qkv, "outputs", torch.cat([rows + i * h * hd for i in range(3)]))
    slice_layer(proj, "inputs", rows)
    set_heads_and_size(module, len(keep), hd)  # (newer timm also joins the heads with attn_dim)


def zero_heads(model: nn.Module, name: str, drop: List[int]) -> None:
    """Zeroes heads ``drop`` of attention module ``name`` in place (the masking counterpart)."""
    module = model.get_submodule(name)
    drop_t = torch.as_tensor(drop, dtype=torch.int64)
    if _transformers_layout(module):
        projections, (out, c), _ = _split_layout(module)
        with torch.no_grad():
            for linear, first, r in projections:
                _as_rows(linear)[first + _rows(drop_t, r)] = 0
                if linear.bias is not None:
                    linear.bias[first + _rows(drop_t, r)] = 0
            _as_rows(out)[:, _rows(drop_t, c)] = 0
        return
    if _packed(module):
        qkv_rows, rows = PrunedMultiheadAttention.head_rows(module, drop_t)
        w, b, out = module.in_proj_weight, module.in_proj_bias, module.out_proj.weight
    else:
        h, hd = heads_and_size(module)
        rows = _rows(drop_t, hd)
        qkv_rows = torch.cat([rows + i * h * hd for i in range(3)])
        qkv, proj = qkv_and_proj(module)
        w, b, out = qkv.weight, qkv.bias, proj.weight
    with torch.no_grad():
        w[qkv_rows] = 0
        if b is not None:
            b[qkv_rows] = 0
        out[:, rows] = 0


def first_tensor(out):
    """A model's output tensor: itself, or the first tensor of a tuple, dict or ModelOutput."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return next((t for t in out if isinstance(t, torch.Tensor)), None)
    return out


def slice_layer(layer: nn.Module, role: str, index: torch.Tensor) -> None:
    """Keeps ``index`` of a projection's "outputs" or "inputs" members (its layer-type entry says
    which tensor dims those are: a Linear's weight rows and bias, a Conv1D's weight columns and
    bias, ...), then updates its size attributes."""
    entry = lookup(type(layer))
    members = [(t, d) for t, d in getattr(entry, role) if getattr(layer, t, None) is not None]
    out = compact([getattr(layer, t).detach() for t, _ in members], [d for _, d in members], [index] * len(members))
    for (t, _), value in zip(members, out):
        setattr(layer, t, nn.Parameter(value, requires_grad=getattr(layer, t).requires_grad))
    resize(layer)


def _verified(model, names, keep, drop, inputs) -> bool:
    """Removing the heads from the modules ``names`` (tied ones together) gives the outputs of
    zeroing them (all but packed attention)."""
    try:
        masked, removed = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
        for name in names:
            zero_heads(masked, name, drop)
            remove_heads(removed, name, keep)
        with torch.no_grad():
            a, b = first_tensor(masked(*inputs)), first_tensor(removed(*inputs))
        return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    except Exception:
        return False


def prune_heads(model: nn.Module, example_inputs, sparsity: float, importance, scope: str,
                kept: Exclusion = Exclusion()) -> nn.Module:
    """Removes ``sparsity`` of the heads of every attention module of ``model`` whose heads ``kept``
    (what ``exclude`` and ``freeze`` name) does not keep; returns it."""
    criterion = resolve(importance)
    if not isinstance(criterion, (Magnitude, FilterNorm, Random)):
        raise ValueError("`importance` must be 'l1', 'l2', 'magnitude', 'filter_norm' or 'random' for "
                         f"granularity='head', got {importance!r}")
    check_scope(scope, allow_dict=False, context="structural pruning")
    inputs = as_inputs(example_inputs)
    modules, every = dict(model.named_modules()), attention_modules(model)
    # a tie (T5's stack) is kept whole if `exclude` or `freeze` keeps any of its modules
    ties = [tie for tie in tied_heads(every) if not any(kept.keeps(head_members(n, every[n]), modules) for n in tie)]
    if not ties:
        raise ValueError("`model` has no attention module whose heads can be pruned (nn.MultiheadAttention, a "
                         "module with num_heads, head_dim, qkv and proj, or transformers' BERT, GPT-2, LLaMA, ViT, "
                         "BART or T5 attention) after `exclude` and `freeze`")
    if isinstance(criterion, Random):
        scores = dict(zip((tie[0] for tie in ties), criterion.unit_scores([units(every[t[0]]) for t in ties])))
    else:  # tied modules: the mean of their normalized scores
        scores = {tie[0]: _head_scores(every[tie[0]], criterion) if len(tie) == 1
                  else normalized_mean([_head_scores(every[n], criterion) for n in tie]) for tie in ties}
    drops = _select_heads(scores, float(sparsity), scope)
    for tie in ties:
        drop = drops[tie[0]]
        keep = [h for h in range(units(every[tie[0]])) if h not in set(drop)]
        if not drop:
            continue
        if not _packed(every[tie[0]]) and not _verified(model, tie, keep, drop, inputs):
            warnings.warn(f"attention module{'s' * (len(tie) > 1)} {', '.join(map(repr, tie))} "
                          f"{'were' if len(tie) > 1 else 'was'} left whole: removing heads does not give the outputs "
                          "of zeroing them (a forward must shape q, k, v from its head count and head size)")
            continue
        for name in tie:
            remove_heads(model, name, keep)
            record_step(model, {"kind": "heads", "module": name, "keep": keep})
    sync_config(model, warn=True)  # a Hugging Face model's config follows its head counts where it can
    return model


def _select_heads(scores: Dict[str, torch.Tensor], sparsity: float, scope: str) -> Dict[str, List[int]]:
    """The heads removed from each module (by name), as the channels' selection chooses them."""
    names = list(scores)
    chosen = select([scores[n] for n in names], [scores[n] for n in names], sparsity, scope)
    return {n: c.tolist() for n, c in zip(names, chosen)}
