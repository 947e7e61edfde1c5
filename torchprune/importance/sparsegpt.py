"""SparseGPT (Frantar & Alistarh 2023): prune a layer and reconstruct the weights it keeps.

The criterion sees the layer's inputs x (rows of the columns its weight multiplies) and builds
H = (2/n) * sum x x^T, the Hessian of the layer's squared output error. It then works through the
columns of W one at a time, as the optimal brain surgeon does: prune a column's pruned entries, then
spread their error over the columns not yet visited through the upper Cholesky factor U of H^-1.
Columns go in blocks of ``block_size``; within a block the update is applied column by column, to
the rest of the weight once per block (a lazy batch update).

It follows the reference (IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``) with these deliberate
differences, each so that the result is exact and never silently wrong:

* a ratio prunes exactly round(sparsity * numel) weights (the rule of `selection.by_ratio`): each
  block gets the share of the target that its columns cover, instead of the reference's per-block
  ``<=`` threshold, which prunes a few extra weights on ties;
* inputs that never fire (dead: H_jj = 0) are pruned first but not zeroed up front: the reference
  zeroes their weights even where the mask keeps them;
* a factorization that fails is retried with ten times the damping (with a warning naming the
  layer), then raises: there is no identity fallback;
* H is factored in float64 (the reference: float32), which costs little next to the column sweep
  and keeps the float32 sweep's decisions those of float64 (tested).

Columns: a Linear's inputs; a conv's unfolded input, kernel position major and input channel minor
(the order of `selection.group_input_last`), so that the N:M groups of consecutive input channels
at one kernel position are consecutive columns. A conv with ``groups > 1`` has one H per group.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import describe
from ..masking import effective_weight
from ..nn.conv import conv_input_and_padding
from ..nn.masked import get_mask
from ..selection import group_input_last
from .activations import ForwardStatistic
from .base import score_precision

__all__ = ["SparseGPT"]

#: How many times a failed factorization is retried, with ten times the damping each time.
_RETRIES = 4
#: The relative damping of the first retry when ``damp`` is 0 (then ten times more at each retry).
_FIRST_RETRY_DAMP = 1e-6


def layer_groups(module: nn.Module) -> int:
    """How many independent column sets (and Hessians) a layer has: its conv ``groups``, 1 for
    Linear. Raises TypeError for a layer type SparseGPT cannot prune."""
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise TypeError(f"SparseGPT prunes Linear, Conv1d and Conv2d layers, got {type(module).__name__}")
    return 1 if isinstance(module, nn.Linear) else module.groups


def weight_columns(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A weight (or anything shaped like it) as (groups, rows per group, columns): a Linear's
    (out, in) as one group; a conv's (out, in/groups, *kernel) with the input channel last."""
    return group_input_last(weight).reshape(groups, weight.shape[0] // groups, -1)


def weight_layout(columns: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of `weight_columns`, for a weight of ``shape`` (a new contiguous tensor)."""
    if len(shape) <= 2:
        return columns.reshape(shape).contiguous()
    return columns.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous()


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input ``x`` of ``module`` as (groups, rows, columns), the rows that `weight_columns`
    multiplies: ``weight_columns(W) @ rows^T`` is the layer's output without the bias. Rows are a
    Linear's tokens, or a conv's output positions, of every sample; batched or unbatched inputs;
    the conv's stride, dilation, padding and padding mode are honored. In float32 (float64 for a
    float64 input): half inputs are upcast, so that their products neither overflow nor round."""
    groups = layer_groups(module)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.detach().to(dtype)
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, module.in_features)
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    x, padding = conv_input_and_padding(module, x)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if spatial == 1:  # a Conv1d is a Conv2d over an input of height 1
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
        padding = (0, padding if isinstance(padding, int) else padding[0])
    unfolded = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C * K, L)
    samples, _, positions = unfolded.shape
    per_group, size = module.in_channels // groups, math.prod(kernel)
    unfolded = unfolded.view(samples, groups, per_group, size, positions)  # unfold runs channel major
    return unfolded.permute(1, 0, 4, 3, 2).reshape(groups, samples * positions, size * per_group)


def saliency(columns: torch.Tensor, diagonal: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The OBS saliency w^2 / U_jj^2 of (groups, rows, columns) weights, 0 on dead columns."""
    return (columns.square() / diagonal[:, None, :].square()).masked_fill(dead[:, None, :], 0.0)


def ratio_counts(kept: torch.Tensor, sparsity: float, bounds: List[Tuple[int, int]]) -> List[int]:
    """How many kept weights each block of columns prunes, so that the layer ends with exactly
    T = round(sparsity * numel) pruned (never fewer than already, never all: `selection.by_ratio`).

    After the block ending at column i2, round(T * i2 / columns) weights are pruned, counting those
    pruned before; a block prunes no more than it keeps, nor than is left of T - already (else a
    mask that pruned more in the later columns would push the total past T). The last block then
    prunes exactly what is left: round(T * i2 / columns) >= T minus the weights after column i2,
    so the earlier blocks never leave the later ones more than they hold.
    """
    numel, columns = kept.numel(), kept.shape[-1]
    per_column = kept.sum((0, 1)).tolist()
    already = numel - sum(per_column)
    target = min(max(int(round(sparsity * numel)), already), max(numel - 1, already))
    left, pruned, counts = target - already, 0, []
    for i1, i2 in bounds:
        kept_here = sum(per_column[i1:i2])
        pruned += (i2 - i1) * numel // columns - kept_here
        count = min(max(int(round(target * i2 / columns)) - pruned, 0), kept_here, left)
        pruned, left = pruned + count, left - count
        counts.append(count)
    return counts


def prune_lowest(scores: torch.Tensor, kept: torch.Tensor, count: int) -> torch.Tensor:
    """``kept`` less its ``count`` lowest-scoring entries over the whole block (ties: lower flat index first)."""
    flat = kept.reshape(-1).clone()
    where = flat.nonzero().squeeze(1)
    order = torch.sort(scores.reshape(-1)[where], stable=True).indices[:count]
    flat[where[order]] = False
    return flat.view_as(kept)


def prune_n_of_m(scores: torch.Tensor, kept: torch.Tensor, n: int) -> torch.Tensor:
    """``kept`` (groups, rows, M) with the lowest-scoring kept entries of each row pruned until at
    most ``n`` are kept (ties: lower column first)."""
    m = kept.shape[-1]
    need = (m - n) - (~kept).sum(-1, keepdim=True)
    order = torch.sort(scores.masked_fill(~kept, math.inf), dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(m, device=order.device).expand_as(order))
    return kept & (rank >= need)


def _check_amount(sparsity, threshold, n_m) -> None:
    if sum(a is not None for a in (sparsity, threshold, n_m)) != 1:
        raise ValueError("pass exactly one of `sparsity`, `threshold` or `n_m`")
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
            raise TypeError(f"`sparsity` must be a number in [0, 1), got {type(sparsity).__name__}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"`threshold` must be a finite real number, got {type(threshold).__name__}")
        if not math.isfinite(threshold):
            raise ValueError(f"`threshold` must be a finite real number, got {threshold}")
    if n_m is not None:
        if (not isinstance(n_m, (tuple, list)) or len(n_m) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in n_m)):
            raise TypeError(f"`n_m` must be a pair of ints (N kept, M), got {n_m!r}")
        if not 0 < n_m[0] < n_m[1]:
            raise ValueError(f"`n_m` needs 0 < N < M, got {tuple(n_m)}")


class SparseGPT(ForwardStatistic):
    """SparseGPT: prunes each layer to the mask and weights that keep its outputs on the
    calibration data closest (Frantar & Alistarh 2023, with the reference's block size and damping).

    Unlike the other criteria it changes the weights it keeps: callers use ``reconstruct()``, which
    returns the mask and the new weight, instead of ``score()`` and a selection. ``score()`` gives
    the OBS saliency w^2 / U_jj^2 for a global ranking across layers. Layers are best calibrated
    one block at a time on the inputs of the already pruned blocks (``sequential_default``).
    ``damp`` is added to H as a fraction of its mean diagonal, so that H stays invertible.

    >>> crit = tp.importance.SparseGPT(block_size=128, damp=0.01)
    >>> tp.prune(model, sparsity=0.5, importance=crit, data=batches)
    """

    requires_data = True
    requires_loss = False
    #: Callers prune with `reconstruct()` instead of `score()` and a selection.
    reconstructs = True
    #: `tp.prune(sequential=None)` calibrates block by block for this criterion.
    sequential_default = True

    def __init__(self, block_size: int = 128, damp: float = 0.01):
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"`block_size` must be an int >= 1, got {type(block_size).__name__}")
        if block_size < 1:
            raise ValueError(f"`block_size` must be an int >= 1, got {block_size}")
        if isinstance(damp, bool) or not isinstance(damp, numbers.Real):
            raise TypeError(f"`damp` must be a finite number >= 0, got {type(damp).__name__}")
        if not (math.isfinite(damp) and damp >= 0):
            raise ValueError(f"`damp` must be a finite number >= 0, got {damp}")
        super().__init__()
        self.block_size = block_size
        self.damp = float(damp)

    def observe_forward(self, module: nn.Module, inputs, output) -> None:
        """Adds the products x x^T of this forward's input rows (in float32 or better) to the layer's
        float64 sum, and the rows to its count. Non-tensor inputs are ignored."""
        x = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
        if not isinstance(x, torch.Tensor):
            return
        rows = input_columns(module, x)
        gram = torch.bmm(rows.transpose(1, 2), rows)
        count = torch.tensor(float(rows.shape[1]), dtype=torch.float64, device=gram.device)
        stats = self._stats.get(id(module))
        if stats is None:
            self._stats[id(module)] = {"gram": gram.double(), "rows": count}
        else:  # added in place, in float64, from the float32 products: no float64 temporary
            stats["gram"].add_(gram)
            stats["rows"].add_(count)

    def hessian(self, module: nn.Module) -> torch.Tensor:
        """H = (2/n) * sum x x^T over the n input rows seen, (groups, columns, columns) in float64."""
        stats = self._stats_of(module)
        if float(stats["rows"]) == 0:
            raise RuntimeError(f"SparseGPT saw no input rows for this {type(module).__name__}: pass non-empty `data`")
        return stats["gram"] * (2.0 / stats["rows"])

    def inverse_factor(self, hessian: torch.Tensor, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(U, dead): U the upper Cholesky factor of the damped H^-1 per group, in float64; dead the
        columns whose input never fired (H_jj = 0; their H_jj becomes 1, they have no cross terms).
        float64 whatever the weight's dtype: H^-1 amplifies rounding by H's condition number, which
        calibration Hessians make large. A failed factorization is retried with ten times the
        damping, with a warning; after `_RETRIES` retries, or for a non-finite H, it raises naming
        ``where``. ``hessian`` is changed (its dead diagonal entries become 1)."""
        if not torch.isfinite(hessian).all():
            raise ValueError(f"SparseGPT: the Hessian of {where} is not finite: its calibration inputs hold NaN or "
                             "inf (or overflow); check the data and the layers before it")
        dead = hessian.diagonal(dim1=-2, dim2=-1) == 0
        hessian.diagonal(dim1=-2, dim2=-1)[dead] = 1.0  # in place: the callers hand over a fresh H
        mean = hessian.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None]
        damp, tried = self.damp, []
        for _ in range(_RETRIES + 1):
            # Memory: at most three (columns x columns) float64 matrices at once (H, the factor, its
            # inverse): no identity matrix and no damped copy beside the factor.
            lower = hessian.clone()
            lower.diagonal(dim1=-2, dim2=-1).add_(damp * mean)
            lower, info = torch.linalg.cholesky_ex(lower)
            if not info.any():
                inverse = torch.cholesky_inverse(lower)
                del lower
                upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
                del inverse
                if not info.any() and torch.isfinite(upper).all():
                    if tried:
                        warnings.warn(f"SparseGPT: the damped Hessian of {where} was not positive definite with "
                                      f"damp={tried}; used damp={damp:g}", RuntimeWarning, stacklevel=3)
                    return upper, dead
            tried.append(damp)
            damp = damp * 10 if damp > 0 else _FIRST_RETRY_DAMP
        raise RuntimeError(f"SparseGPT: the damped Hessian of {where} is not positive definite even with damp={tried} "
                           "(relative to its mean diagonal); pass more calibration data or a larger `damp`")

    def score(self, module: nn.Module) -> torch.Tensor:
        """The OBS saliency w^2 / U_jj^2 of the effective weight, shaped like it (0 on dead inputs);
        float32 for half weights."""
        weight = score_precision(effective_weight(module))
        upper, dead = self.inverse_factor(self.hessian(module).to(weight.device), f"this {type(module).__name__}")
        columns = weight_columns(weight, layer_groups(module))
        diagonal = upper.diagonal(dim1=-2, dim2=-1).to(columns.dtype)
        return weight_layout(saliency(columns, diagonal, dead), weight.shape)

    def reconstruct(self, module: nn.Module, name: str, *, sparsity: Optional[float] = None,
                    threshold: Optional[float] = None, n_m: Optional[Tuple[int, int]] = None,
                    kept: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mask, weight): the keep-mask (True = kept) and the new weight, zero where pruned, with the
        dtype, device and shape of ``module.weight``; ``module`` is not changed. Exactly one of
        ``sparsity`` (a fraction of the weights, exact count), ``threshold`` (saliency below it at
        the start of each block) or ``n_m`` (N kept in every M consecutive input channels).
        ``kept`` is the current mask (None: the layer's own mask, or none): what it prunes stays
        pruned and counts toward the amount. ``name`` names the layer in messages."""
        _check_amount(sparsity, threshold, n_m)
        weight = module.weight.detach()
        groups = layer_groups(module)
        inputs = module.in_features if isinstance(module, nn.Linear) else module.in_channels // groups
        if n_m is not None and inputs % n_m[1]:
            raise ValueError(f"SparseGPT: {n_m[0]}:{n_m[1]} needs M={n_m[1]} to divide the input size of layer "
                             f"{name!r}, got {inputs}")
        kept = get_mask(module) if kept is None else kept
        if kept is not None and not isinstance(kept, torch.Tensor):
            raise TypeError(f"`kept` must be a bool tensor or None, got {describe(kept)}")
        if kept is not None and (kept.dtype != torch.bool or kept.shape != weight.shape):
            raise ValueError(f"`kept` must be a bool tensor of the shape of layer {name!r}'s weight "
                             f"{list(weight.shape)}, got {describe(kept)} of {kept.dtype}")
        if not self.observed(module):
            raise RuntimeError(f"SparseGPT has no calibration statistics for layer {name!r}: pass `data` to prune() "
                               "(or run forward passes with observe_forward() hooked in)")
        if not torch.isfinite(weight).all():
            raise ValueError(f"SparseGPT: the weight of layer {name!r} holds NaN or inf")
        upper, dead = self.inverse_factor(self.hessian(module).to(weight.device), f"layer {name!r}")
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        mask = torch.ones_like(weight, dtype=torch.bool) if kept is None else kept.to(device=weight.device)
        mask = weight_columns(mask, groups).clone()
        columns = weight_columns(weight, groups).to(compute).masked_fill(~mask, 0.0)
        self._prune(columns, mask, upper.to(compute), dead, sparsity, threshold, n_m)
        return weight_layout(mask, weight.shape), weight_layout(columns, weight.shape).to(weight.dtype)

    def _prune(self, weight: torch.Tensor, mask: torch.Tensor, upper: torch.Tensor, dead: torch.Tensor,
               sparsity: Optional[float], threshold: Optional[float], n_m: Optional[Tuple[int, int]]) -> None:
        """The column sweep, in place on ``weight`` and ``mask`` (groups, rows, columns), batched
        over the groups: per block, choose the block's mask (ratio, threshold) or each M columns'
        (N:M) on the updated weights, prune column by column spreading each column's error over the
        block's later columns, then update the columns after the block with the block's errors."""
        columns = weight.shape[-1]
        m = n_m[1] if n_m is not None else 1
        block = -(-self.block_size // m) * m  # whole N:M groups per block
        bounds = [(i1, min(i1 + block, columns)) for i1 in range(0, columns, block)]
        counts = ratio_counts(mask, sparsity, bounds) if sparsity is not None else None
        diagonal = upper.diagonal(dim1=-2, dim2=-1)
        for b, (i1, i2) in enumerate(bounds):
            w1, kept, u1 = weight[..., i1:i2].clone(), mask[..., i1:i2].clone(), upper[:, i1:i2, i1:i2]
            q1, errors = torch.zeros_like(w1), torch.zeros_like(w1)
            if n_m is None:
                scores = saliency(w1, diagonal[:, i1:i2], dead[:, i1:i2])
                kept = kept & (scores >= threshold) if counts is None else prune_lowest(scores, kept, counts[b])
            for i in range(i2 - i1):
                if n_m is not None and i % m == 0:
                    scores = saliency(w1[..., i:i + m], diagonal[:, i1 + i:i1 + i + m], dead[:, i1 + i:i1 + i + m])
                    kept[..., i:i + m] = prune_n_of_m(scores, kept[..., i:i + m], n_m[0])
                w = w1[..., i]
                q = torch.where(kept[..., i], w, 0.0)
                error = (w - q) / u1[:, i, i, None]
                w1[..., i:].addcmul_(error[..., None], u1[:, None, i, i:], value=-1)  # no temporary
                q1[..., i], errors[..., i] = q, error
            weight[..., i1:i2], mask[..., i1:i2] = q1, kept
            weight[..., i2:] -= torch.bmm(errors, upper[:, i1:i2, i2:])
