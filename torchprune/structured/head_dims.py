"""Channel pruning inside hand-written attention: fewer features per head (a smaller ``head_dim``).

A timm-style attention module (heads.py's `hand_written` layout: a fused ``qkv`` Linear, a
``proj`` Linear, int ``num_heads`` and ``head_dim``, or the names `register_attention` declared
for its class) shapes q, k and v with a fixed head size,
``qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)``, so the channel tracer must keep its qkv
outputs and proj inputs whole ("reshape with a fixed size for a pruned dim"). With
``granularity="channel"`` this step shrinks the head size instead, after the traced channels go:

* Every head keeps the same count, ``floor((1 - sparsity) * head_dim)`` (then ``round_to``), of its
  q/k features and of its v features, whatever the scope: one ``head_dim`` shapes all three.
  q and k lose the same positions (q @ k^T contracts them together); v loses positions together
  with the proj columns that read them, and may keep other positions than q/k.
* Features are scored by weight norm (the criterion's ``p`` where it has one, else 2): a q/k
  position by its q and k rows, a v position by its v row and proj column, each part divided by
  its mean over the module (as scoring.py does for channel groups).
* ``head_dim``, and where the module has them ``attn_dim`` (heads x head size) and ``scale``, are
  rewritten. The attention scores must not change, but F.scaled_dot_product_attention without a
  ``scale`` uses 1/sqrt(q.size(-1)), which now reads the smaller size. So q's rows are multiplied
  by sqrt(new / old) and ``scale`` is set to new ** -0.5, what the module would hold had it been
  built with the new size: the fused and the explicit (``q * self.scale``) paths then both give
  the old scores.
* Each module is checked on the example inputs before it changes: its output with the features
  removed must equal its output with them zeroed, within a bound on float rounding (4 x the terms
  summed x unit roundoff x the largest output). The rescaled version is tried first, then the
  plain one (no rescaling: a forward with its own constant scale); a module that fails both (q/k
  norms over the head, a gate, a forward that does not shape from these attributes) stays whole
  and is named in a warning.

The removal is recorded as a ``"head_dims"`` step for `tp.load`.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from ..calibration import as_inputs
from .exclusion import Exclusion
from .heads import (
    attention_names,
    first_tensor,
    hand_written,
    head_members,
    heads_and_size,
    normalized_mean,
    qkv_and_proj,
    set_heads_and_size,
    slice_layer,
)
from .plan import record_step
from .select import rounded_keep

__all__ = ["shrink_head_dims", "apply_head_dims", "zero_head_dims"]


def _captured_inputs(model: nn.Module, names: List[str], example_inputs) -> Dict[str, tuple]:
    """(args, kwargs) each named module is called with in one eval forward of ``example_inputs``."""
    captured: Dict[str, tuple] = {}
    modules = dict(model.named_modules())

    def hook(name):
        def record(module, args, kwargs):
            captured.setdefault(name, (args, kwargs))
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*as_inputs(example_inputs))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return captured


def _dim_scores(module: nn.Module, p: float):
    """([heads, head_dim] scores of the q/k positions, [heads, head_dim] of the v positions)."""
    (h, hd), (qkv, proj) = heads_and_size(module), qkv_and_proj(module)
    w = qkv.weight.detach().double().abs().pow(p).sum(1).reshape(3, h, hd)
    proj = proj.weight.detach().double().abs().pow(p).sum(0).reshape(h, hd)
    return normalized_mean([w[0], w[1]]), normalized_mean([w[2], proj])


def _kept(scores: torch.Tensor, keep: int) -> List[List[int]]:
    """Per head, the ``keep`` best positions (ties by index), sorted."""
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :keep]
    return torch.sort(order, dim=1).values.tolist()


def _rows(kept: List[List[int]], hd: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([offset + h * hd + j for h, js in enumerate(kept) for j in js], dtype=torch.int64)


def apply_head_dims(module: nn.Module, qk: List[List[int]], v: List[List[int]], scale: Optional[float]) -> None:
    """Keeps positions ``qk`` of every head's q and k and ``v`` of its v (and proj's columns), and
    rewrites the size attributes; ``scale`` (not None): q's rows are rescaled to the new size and
    the module's scale attribute, if it has one, becomes ``scale`` (see the module docstring)."""
    (h, hd), (qkv, proj), new = heads_and_size(module), qkv_and_proj(module), len(qk[0])
    inner = h * hd
    rows = torch.cat([_rows(qk, hd), _rows(qk, hd, inner), _rows(v, hd, 2 * inner)])
    slice_layer(qkv, "outputs", rows)
    slice_layer(proj, "inputs", _rows(v, hd))
    if scale is not None:
        factor = math.sqrt(new / hd)
        with torch.no_grad():
            qkv.weight[: h * new] *= factor
            if qkv.bias is not None:
                qkv.bias[: h * new] *= factor
        if hasattr(module, attention_names(module).scale):  # (a module with no scale attribute gets none)
            setattr(module, attention_names(module).scale, scale)
    set_heads_and_size(module, h, new)


def zero_head_dims(module: nn.Module, qk: List[List[int]], v: List[List[int]]) -> None:
    """Zeroes every position of q/k and of v that ``qk`` and ``v`` do not keep (the masking
    counterpart of `apply_head_dims`)."""
    (h, hd), (qkv, proj) = heads_and_size(module), qkv_and_proj(module)
    drop_qk = [[j for j in range(hd) if j not in set(js)] for js in qk]
    drop_v = [[j for j in range(hd) if j not in set(js)] for js in v]
    rows = torch.cat([_rows(drop_qk, hd), _rows(drop_qk, hd, h * hd), _rows(drop_v, hd, 2 * h * hd)])
    with torch.no_grad():
        qkv.weight[rows] = 0
        if qkv.bias is not None:
            qkv.bias[rows] = 0
        proj.weight[:, _rows(drop_v, hd)] = 0


def _run(module: nn.Module, inputs) -> Optional[torch.Tensor]:
    args, kwargs = inputs
    with torch.no_grad():
        return first_tensor(module(*args, **kwargs))


def _difference(module: nn.Module, qk, v, scale, inputs, zeroed: torch.Tensor) -> float:
    """How far removal (rescaled when ``scale`` is not None) is from ``zeroed``, the output of zeroing
    on ``inputs``, over an error bound for the module's sums (inf if the removal does not run or
    changes the shape)."""
    try:
        removed = copy.deepcopy(module).eval()
        apply_head_dims(removed, qk, v, scale)
        a, b = zeroed, _run(removed, inputs)
        if a.shape != b.shape or not a.is_floating_point():
            return math.inf
        # summation error: the qkv and proj sums and the sums over tokens, 4 x n x unit roundoff of
        # the largest output (softmax and exp add a few roundings more)
        qkv, proj = qkv_and_proj(module)
        terms = qkv.in_features + proj.in_features + (a.shape[-2] if a.dim() > 1 else 1)
        bound = 4 * terms * torch.finfo(a.dtype).eps * float(a.abs().max()) + torch.finfo(a.dtype).tiny
        return float((a - b).abs().max()) / bound
    except Exception:  # a forward that cannot run with the new sizes: not this layout
        return math.inf


def _scale_that_holds(module: nn.Module, qk, v, new: int, inputs):
    """The removal that gives the outputs of zeroing within the bound: rescaled (``new ** -0.5``) if
    it does, else plain (None); False if neither does (or the module does not run)."""
    try:
        zeroed = copy.deepcopy(module).eval()
        zero_head_dims(zeroed, qk, v)
        reference = _run(zeroed, inputs)  # once, for both candidates
    except Exception:  # the module does not run on its own captured inputs: not this layout
        return False
    if not isinstance(reference, torch.Tensor):
        return False
    return next((scale for scale in (new ** -0.5, None)
                 if _difference(module, qk, v, scale, inputs, reference) <= 1), False)


def shrink_head_dims(model: nn.Module, example_inputs, sparsity: float, p: float, kept: Exclusion = Exclusion(),
                     round_to: int = 1) -> List[str]:
    """Shrinks the head size of every hand-written attention module of ``model`` that ``kept`` does
    not keep (see the module docstring); returns the names of the modules changed."""
    modules = dict(model.named_modules())
    found = [n for n, m in modules.items() if hand_written(m) and not kept.keeps(head_members(n, m), modules)]
    if not found:
        return []
    inputs = _captured_inputs(model, found, example_inputs)
    changed, failed = [], []
    for name in found:
        module, hd = modules[name], heads_and_size(modules[name])[1]
        keep = rounded_keep(int(math.floor((1 - sparsity) * hd + 1e-9)), hd, round_to)
        if keep >= hd or name not in inputs:
            continue
        qk_scores, v_scores = _dim_scores(module, p)
        qk, v = _kept(qk_scores, keep), _kept(v_scores, keep)
        scale = _scale_that_holds(module, qk, v, keep, inputs[name])
        if scale is False:
            failed.append(name)
            continue
        apply_head_dims(module, qk, v, scale)
        record_step(model, {"kind": "head_dims", "module": name, "qk": qk, "v": v, "scale": scale})
        changed.append(name)
    if failed:
        warnings.warn(f"kept the head size of attention modules {failed}: removing features of their heads does "
                      "not give the outputs of zeroing them (their forward must shape q, k, v from self.num_heads "
                      "and self.head_dim, with no norm or gate over the head)", UserWarning, stacklevel=4)
    return changed
