"""prune(..., granularity="head"): remove whole attention heads.

Two kinds of attention are handled:

* ``nn.MultiheadAttention`` (packed q/k/v projection, no bias_k/bias_v, no add_zero_attn) and our
  own `PrunedMultiheadAttention`: the module is replaced by a `PrunedMultiheadAttention` holding
  the kept heads (nn.MultiheadAttention cannot have fewer heads than its input is wide);
* hand-written attention that follows the timm convention: a module with int attributes
  ``num_heads`` and ``head_dim``, a fused ``qkv`` Linear with 3 * num_heads * head_dim outputs laid
  out [q | k | v] and heads contiguous within each, and a ``proj`` Linear reading
  num_heads * head_dim features. Its forward must shape tensors from ``self.num_heads`` /
  ``self.head_dim``; that is verified on the example inputs before anything is changed (removing
  the heads must give the outputs of zeroing them), and a module that fails is left as it is and
  named in a warning.

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
from .plan import record_step
from .select import select
from .tracing.recorder import Member

__all__ = ["attention_modules", "head_members", "prune_heads", "remove_heads"]


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


def attention_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if _packed(m) or _hand_written(m)}


def head_members(name: str, module: nn.Module) -> List[Member]:
    """The (module name, tensor, dim) members that lose a head's slices: the q/k/v rows and the
    out-projection's columns (what `exclude` and `freeze` are checked against)."""
    prefix = f"{name}." if name else ""
    if _packed(module):
        return [(name, "in_proj_weight", 0), (prefix + "out_proj", "weight", 1)]
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


def _verified(model, name, keep, drop, inputs) -> bool:
    """Removing the heads gives the outputs of zeroing them (hand-written attention only)."""
    try:
        masked, removed = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
        zero_heads(masked, name, drop)
        remove_heads(removed, name, keep)
        with torch.no_grad():
            a, b = masked(*inputs), removed(*inputs)
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
        raise ValueError("`model` has no attention module whose heads can be pruned (nn.MultiheadAttention, "
                         "or a module with num_heads, head_dim, qkv and proj) after `exclude` and `freeze`")
    if isinstance(criterion, Random):
        scores = dict(zip(found, criterion.unit_scores([m.num_heads for m in found.values()])))
    else:
        scores = {n: _head_scores(m, criterion) for n, m in found.items()}
    drops = _select_heads(scores, float(sparsity), scope)
    for name, drop in drops.items():
        heads = found[name].num_heads
        keep = [h for h in range(heads) if h not in set(drop)]
        if not drop:
            continue
        if not _packed(found[name]) and not _verified(model, name, keep, drop, inputs):
            warnings.warn(f"attention module {name!r} was left whole: removing its heads does not give the outputs "
                          "of zeroing them (its forward must shape q, k, v from self.num_heads and self.head_dim)")
            continue
        remove_heads(model, name, keep)
        record_step(model, {"kind": "heads", "module": name, "keep": keep})
    return model


def _select_heads(scores: Dict[str, torch.Tensor], sparsity: float, scope: str) -> Dict[str, List[int]]:
    """The heads removed from each module (by name), as the channels' selection chooses them."""
    names = list(scores)
    chosen = select([scores[n] for n in names], [scores[n] for n in names], sparsity, scope)
    return {n: c.tolist() for n, c in zip(names, chosen)}
