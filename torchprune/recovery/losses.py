"""Distillation losses: how far a pruned student's outputs are from its dense teacher's.

Recovery after pruning usually has no labels, only the dense model: the student learns to give the
teacher's outputs back. Each loss compares two tensors of the same shape ``[..., features]``
position by position, over the positions that ``mask`` keeps (a Hugging Face batch's
``attention_mask``: padding never counts):

* ``"cosine"``: 1 - cosine of the feature vectors (the direction of hidden states or embeddings);
* ``"mse"``: mean squared error divided by the teacher's variance over the kept positions, so
  that its scale is the same for every model (1 = as far as predicting the teacher's mean);
* ``"kl"``: KL(teacher || student) of the softmaxes at a temperature T, times T^2 (Hinton et al.
  2015), for logits;
* ``"embedding"``: for sentence encoders, 1 - cosine of the mean-pooled, sequence-level embeddings
  plus the token-level ``"mse"``: the embedding is what the user reads, the tokens keep it stable.

`output_tensor` picks the tensor to compare from a model's output (``last_hidden_state``, then
``logits``, a tensor, or a tuple's first element).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..calibration import Inputs

__all__ = ["KINDS", "distillation_loss", "output_tensor", "token_mask", "mean_pool"]

KINDS = ("cosine", "mse", "kl", "embedding")
_TINY = 1e-12  # keeps the variance of a constant teacher output from dividing by zero


def output_tensor(output: Any, key: Optional[str] = None) -> Tensor:
    """The tensor distilled from a model's ``output``: ``output[key]`` or ``output.key`` when ``key``
    is given; else ``last_hidden_state``, then ``logits`` (Hugging Face outputs), the output itself
    when it is a tensor, or the first element of a tuple/list. TypeError when there is none."""
    if key is not None:
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if not isinstance(value, Tensor):
            raise TypeError(f"`output`={key!r}: the model's output has no tensor {key!r} "
                            f"(it is a {type(output).__name__})")
        return value
    for name in ("last_hidden_state", "logits"):
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find the tensor to distil in a model output of type {type(output).__name__}: "
                    "pass `output=` naming it (e.g. 'logits'), or a `loss` callable")


def token_mask(inputs: Any) -> Optional[Tensor]:
    """The ``attention_mask`` of a batch given as a Mapping or as `tp.Inputs` keywords, else None."""
    kwargs = inputs.kwargs if isinstance(inputs, Inputs) else inputs if isinstance(inputs, Mapping) else {}
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, Tensor) else None


def _kept(student: Tensor, teacher: Tensor, mask: Optional[Tensor]):
    """Both tensors as ``[positions, features]``, only the positions ``mask`` keeps."""
    features = student.shape[-1]
    if mask is None:
        return student.reshape(-1, features), teacher.reshape(-1, features)
    keep = mask.to(torch.bool).reshape(-1)
    if keep.numel() != student.numel() // max(features, 1):
        raise ValueError(f"`mask` of shape {tuple(mask.shape)} does not match the outputs' positions "
                         f"{tuple(student.shape[:-1])}")
    return student.reshape(-1, features)[keep], teacher.reshape(-1, features)[keep]


def _normalized_mse(student: Tensor, teacher: Tensor) -> Tensor:
    return F.mse_loss(student, teacher) / teacher.detach().var(unbiased=False).clamp_min(_TINY)


def mean_pool(states: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``[batch, tokens, features]`` over each row's kept tokens (all without ``mask``): the
    sentence embedding of sentence-transformers' mean pooling, before normalization."""
    if states.dim() != 3:
        raise ValueError(f"the 'embedding' loss needs [batch, tokens, features] outputs, got {tuple(states.shape)}")
    if mask is None:
        return states.mean(1)
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def distillation_loss(student: Tensor, teacher: Tensor, kind: str = "cosine", mask: Optional[Tensor] = None,
                      temperature: float = 2.0) -> Tensor:
    """The ``kind`` loss (one of `KINDS`, see the module docstring) of ``student`` against
    ``teacher``, two tensors of the same shape ``[..., features]``; ``mask`` (shape ``[...]``, bool
    or 0/1) keeps positions. A scalar; the teacher gets no gradient."""
    if kind not in KINDS:
        raise ValueError(f"`loss` must be one of {', '.join(map(repr, KINDS))} or a callable, got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher outputs differ in shape: {tuple(student.shape)} vs "
                         f"{tuple(teacher.shape)}")
    teacher = teacher.detach().to(student.dtype)
    if kind == "embedding":
        pooled = F.cosine_similarity(mean_pool(student, mask), mean_pool(teacher, mask), dim=-1)
        return (1 - pooled).mean() + _normalized_mse(*_kept(student, teacher, mask))
    s, t = _kept(student, teacher, mask)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "mse":
        return _normalized_mse(s, t)
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}")
    log_student = F.log_softmax(s / temperature, dim=-1)
    log_teacher = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature ** 2
