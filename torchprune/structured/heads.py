"""prune(..., granularity="head"): remove whole attention heads.

Four kinds of attention are handled:

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
* transformers' grouped-query attention (LLaMA, Mistral, Qwen2: ``q_proj``/``k_proj``/``v_proj``/
  ``o_proj``, ``head_dim``, ``num_key_value_groups``): the unit is a key/value head with its group of
  query heads, so the groups stay whole;
* transformers' BERT-family attention block (``self.query``/``key``/``value`` with
  ``num_attention_heads`` and ``attention_head_size``, ``output.dense``): the unit is a head.
  These two are verified like hand-written attention; hf_config.py then rewrites the model's config.

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
import warnings
from typing import Dict, List

import torch
from torch import nn

from ..calibration import as_inputs
from ..importance import FilterNorm, Magnitude, Random, resolve
from ..nn.attention import PrunedMultiheadAttention
from ..ops import compact
from ..targets import check_scope
from .exclusion import Exclusion
from .hf_config import sync_config
from .plan import record_step
from .select import select
from .tracing.recorder import Member

__all__ = ["attention_modules", "head_members", "prune_heads", "remove_heads", "units"]


def _packed(module) -> bool:
    if isinstance(module, PrunedMultiheadAttention):
        return True
    return (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim and module.bias_k is None
            and not module.add_zero_attn)


def _hand_written(module) -> bool:
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    h, hd = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    return (isinstance(h, int) and isinstance(hd, int) and isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
            and qkv.out_features == 3 * h * hd and proj.in_features == h * hd)


def _linears(module, names) -> List[nn.Linear]:
    found = [getattr(module, n, None) for n in names]
    return found if all(isinstance(t, nn.Linear) for t in found) else []


def _grouped_query(module) -> bool:
    """transformers' LLaMA / Mistral / Qwen2 attention: q/k/v/o_proj Linears, an int ``head_dim``
    and ``num_key_value_groups`` query heads per key/value head (grouped-query attention)."""
    projections = _linears(module, ("q_proj", "k_proj", "v_proj", "o_proj"))
    hd, rep = getattr(module, "head_dim", None), getattr(module, "num_key_value_groups", None)
    if not projections or not isinstance(hd, int) or not isinstance(rep, int) or hd < 1 or rep < 1:
        return False
    q, k, v, o = projections
    return (k.out_features == v.out_features and k.out_features % hd == 0
            and q.out_features == k.out_features * rep == o.in_features)


def _separate_qkv(module) -> bool:
    """transformers' BERT-family attention block: ``self`` with query/key/value Linears,
    ``num_attention_heads`` and ``attention_head_size``, and ``output.dense`` reading them."""
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    projections = _linears(inner, ("query", "key", "value")) if inner is not None else []
    dense = getattr(output, "dense", None)
    h, hd = getattr(inner, "num_attention_heads", None), getattr(inner, "attention_head_size", None)
    return (bool(projections) and isinstance(dense, nn.Linear) and isinstance(h, int) and isinstance(hd, int)
            and all(t.out_features == h * hd for t in projections) and dense.in_features == h * hd)


def _split_layout(module):
    """For the two transformers layouts: [(Linear, rows per unit)] of the projections that make a
    unit's features, (Linear, columns per unit) of the one that reads them, and the unit count. A
    unit is a head (BERT) or a key/value head with its group of query heads (LLaMA), so groups stay
    whole and ``num_key_value_groups`` stays valid."""
    if _grouped_query(module):
        hd, rep = module.head_dim, module.num_key_value_groups
        return ([(module.q_proj, hd * rep), (module.k_proj, hd), (module.v_proj, hd)], (module.o_proj, hd * rep),
                module.k_proj.out_features // hd)
    inner, hd = module.self, module.self.attention_head_size
    return ([(inner.query, hd), (inner.key, hd), (inner.value, hd)], (module.output.dense, hd),
            inner.num_attention_heads)


def units(module) -> int:
    """The heads (key/value heads with their query groups, for grouped-query attention) of an
    attention module ``attention_modules`` found."""
    return _split_layout(module)[2] if _grouped_query(module) or _separate_qkv(module) else module.num_heads


def attention_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if _packed(m) or _hand_written(m) or _grouped_query(m) or _separate_qkv(m)}


def head_members(name: str, module: nn.Module) -> List[Member]:
    """The (module name, tensor, dim) members that lose a head's slices: the q/k/v rows and the
    out-projection's columns (what `exclude` and `freeze` are checked against)."""
    prefix = f"{name}." if name else ""
    if _packed(module):
        return [(name, "in_proj_weight", 0), (prefix + "out_proj", "weight", 1)]
    if _grouped_query(module):
        return [(prefix + p, "weight", 0) for p in ("q_proj", "k_proj", "v_proj")] + [(prefix + "o_proj", "weight", 1)]
    if _separate_qkv(module):
        return ([(prefix + "self." + p, "weight", 0) for p in ("query", "key", "value")]
                + [(prefix + "output.dense", "weight", 1)])
    return [(prefix + "qkv", "weight", 0), (prefix + "proj", "weight", 1)]


def _slices(module):
    """(q, k, v row blocks, output projection) of the per-head members, and v's features per head."""
    h, hd = module.num_heads, module.head_dim
    vhd = getattr(module, "v_head_dim", hd)
    if _packed(module):
        w, out = module.in_proj_weight.detach(), module.out_proj.weight.detach()
    else:
        w, out = module.qkv.weight.detach(), module.proj.weight.detach()
    return (w[: h * hd], w[h * hd : 2 * h * hd], w[2 * h * hd :]), out, vhd


def _head_scores(module, criterion) -> torch.Tensor:
    if _grouped_query(module) or _separate_qkv(module):
        projections, (out, c), n = _split_layout(module)
        p = float(getattr(criterion, "p", 1))
        parts = [t.weight.detach().double().abs().pow(p).reshape(n, -1).sum(1) for t, _ in projections]
        parts.append(out.weight.detach().double().abs().pow(p).reshape(out.out_features, n, c).sum((0, 2)))
        return sum(s / s.mean() if s.mean() > 0 else s for s in parts) / len(parts)
    h = module.num_heads
    (q, k, v), out, vhd = _slices(module)
    p = float(getattr(criterion, "p", 1))
    parts = [t.double().abs().pow(p).reshape(h, -1).sum(1) for t in (q, k, v)]
    parts.append(out.double().abs().pow(p).reshape(out.shape[0], h, vhd).sum((0, 2)))
    return sum(s / s.mean() if s.mean() > 0 else s for s in parts) / 4


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
    bert = _separate_qkv(module)  # (before slicing: the shapes then no longer match the head count)
    if bert or _grouped_query(module):
        projections, (out, c), _ = _split_layout(module)
        for linear, r in projections:
            _slice_linear(linear, 0, _rows(keep_t, r))
        _slice_linear(out, 1, _rows(keep_t, c))
        if bert:
            module.self.num_attention_heads = len(keep)
            module.self.all_head_size = len(keep) * module.self.attention_head_size
        return
    hd, inner = module.head_dim, module.num_heads * module.head_dim
    rows = _rows(keep_t, hd)
    qkv_rows = torch.cat([rows + i * inner for i in range(3)])
    tensors = [module.qkv.weight, module.proj.weight] + ([module.qkv.bias] if module.qkv.bias is not None else [])
    dims = [0, 1] + ([0] if module.qkv.bias is not None else [])
    out = compact([t.detach() for t in tensors], dims,
                  [qkv_rows, rows] + ([qkv_rows] if module.qkv.bias is not None else []))
    module.qkv.weight = nn.Parameter(out[0], requires_grad=module.qkv.weight.requires_grad)
    module.proj.weight = nn.Parameter(out[1], requires_grad=module.proj.weight.requires_grad)
    if module.qkv.bias is not None:
        module.qkv.bias = nn.Parameter(out[2], requires_grad=module.qkv.bias.requires_grad)
    module.qkv.out_features, module.proj.in_features = out[0].shape[0], out[1].shape[1]
    module.num_heads = len(keep)


def zero_heads(model: nn.Module, name: str, drop: List[int]) -> None:
    """Zeroes heads ``drop`` of attention module ``name`` in place (the masking counterpart)."""
    module = model.get_submodule(name)
    drop_t = torch.as_tensor(drop, dtype=torch.int64)
    if _grouped_query(module) or _separate_qkv(module):
        projections, (out, c), _ = _split_layout(module)
        with torch.no_grad():
            for linear, r in projections:
                linear.weight[_rows(drop_t, r)] = 0
                if linear.bias is not None:
                    linear.bias[_rows(drop_t, r)] = 0
            out.weight[:, _rows(drop_t, c)] = 0
        return
    if _packed(module):
        qkv_rows, rows = PrunedMultiheadAttention.head_rows(module, drop_t)
        w, b, out = module.in_proj_weight, module.in_proj_bias, module.out_proj.weight
    else:
        hd, inner = module.head_dim, module.num_heads * module.head_dim
        rows = _rows(drop_t, hd)
        qkv_rows = torch.cat([rows + i * inner for i in range(3)])
        w, b, out = module.qkv.weight, module.qkv.bias, module.proj.weight
    with torch.no_grad():
        w[qkv_rows] = 0
        if b is not None:
            b[qkv_rows] = 0
        out[:, rows] = 0


def _first_tensor(out):
    """A model's output tensor: itself, or the first tensor of a tuple, dict or ModelOutput."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return next((t for t in out if isinstance(t, torch.Tensor)), None)
    return out


def _slice_linear(linear: nn.Linear, dim: int, index: torch.Tensor) -> None:
    """Keeps ``index`` along ``dim`` of a Linear's weight (and of its bias along the outputs)."""
    tensors = [linear.weight] + ([linear.bias] if dim == 0 and linear.bias is not None else [])
    out = compact([t.detach() for t in tensors], [dim] + [0] * (len(tensors) - 1), [index] * len(tensors))
    linear.weight = nn.Parameter(out[0], requires_grad=linear.weight.requires_grad)
    if len(out) > 1:
        linear.bias = nn.Parameter(out[1], requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _verified(model, name, keep, drop, inputs) -> bool:
    """Removing the heads gives the outputs of zeroing them (hand-written attention only)."""
    try:
        masked, removed = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
        zero_heads(masked, name, drop)
        remove_heads(removed, name, keep)
        with torch.no_grad():
            a, b = _first_tensor(masked(*inputs)), _first_tensor(removed(*inputs))
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
    modules = dict(model.named_modules())
    found = {n: m for n, m in attention_modules(model).items() if not kept.keeps(head_members(n, m), modules)}
    if not found:
        raise ValueError("`model` has no attention module whose heads can be pruned (nn.MultiheadAttention, a "
                         "module with num_heads, head_dim, qkv and proj, or transformers' BERT or LLaMA attention) "
                         "after `exclude` and `freeze`")
    if isinstance(criterion, Random):
        scores = dict(zip(found, criterion.unit_scores([units(m) for m in found.values()])))
    else:
        scores = {n: _head_scores(m, criterion) for n, m in found.items()}
    drops = _select_heads(scores, float(sparsity), scope)
    for name, drop in drops.items():
        heads = units(found[name])
        keep = [h for h in range(heads) if h not in set(drop)]
        if not drop:
            continue
        if not _packed(found[name]) and not _verified(model, name, keep, drop, inputs):
            warnings.warn(f"attention module {name!r} was left whole: removing its heads does not give the outputs "
                          "of zeroing them (its forward must shape q, k, v from self.num_heads and self.head_dim)")
            continue
        remove_heads(model, name, keep)
        record_step(model, {"kind": "heads", "module": name, "keep": keep})
    sync_config(model, warn=True)  # a Hugging Face model's config follows its head counts where it can
    return model


def _select_heads(scores: Dict[str, torch.Tensor], sparsity: float, scope: str) -> Dict[str, List[int]]:
    """The heads removed from each module (by name), as the channels' selection chooses them."""
    names = list(scores)
    chosen = select([scores[n] for n in names], [scores[n] for n in names], sparsity, scope)
    return {n: c.tolist() for n, c in zip(names, chosen)}
