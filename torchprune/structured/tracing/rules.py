"""How each module and op moves channel labels (see labels.py for what a label is).

A rule gets the tracer, the fx node, the real values of the node's inputs (the tracer runs the
model on the example inputs while it labels it) and returns the label of the node's output. Layers
record their *members*: ``(module name, tensor name, dim)`` -> the id of each index along ``dim``,
which is what removal slices. Anything without a rule freezes the ids that reach it.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import layer_types
from .labels import NONE, compress

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_UNARY = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.mish, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, torch.neg, operator.neg,
    torch.abs, torch.exp, torch.clamp, torch.square, torch.sqrt,
    # F.normalize divides by the norm along a dim: a zeroed channel adds nothing to the norm, so
    # removing it equals zeroing it whichever dim it runs along
    F.normalize,
}
_UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "neg", "abs", "exp", "clamp", "clamp_", "clamp_min",
    "clamp_max", "square", "sqrt", "float", "double", "half", "bfloat16", "to", "type_as", "clone", "detach",
    "contiguous",
}
_BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
    operator.pow, operator.ipow, torch.pow,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow", "pow_"}
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}
# Ops that only rearrange positions: the rule runs the op itself on the label tensor.
_SHAPE_FUNCTIONS = {
    torch.flatten, torch.transpose, torch.permute, torch.reshape, torch.squeeze, torch.unsqueeze, torch.movedim,
    torch.cat, torch.concat, torch.stack, torch.unbind, torch.chunk, torch.split, torch.t, torch.narrow,
    torch.select, operator.getitem, torch.unflatten,
}
_SHAPE_METHODS = {
    "flatten", "transpose", "permute", "reshape", "view", "squeeze", "unsqueeze", "movedim", "unbind", "chunk",
    "split", "t", "narrow", "select", "expand", "expand_as", "repeat", "unflatten",
}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}


def is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def full(label: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return label.expand(value.shape)


_UNOWNED = {}  # ndim -> the label of a value no unit owns (labels are never changed in place: shared)


def at_rank(label: torch.Tensor, nd: int) -> torch.Tensor:
    """``label`` as a view with leading size-1 dims up to ``nd`` dims (how it broadcasts)."""
    return label.view((1,) * (nd - label.dim()) + tuple(label.shape)) if label.dim() < nd else label


def unowned(value: torch.Tensor) -> torch.Tensor:
    nd = value.dim()
    label = _UNOWNED.get(nd)
    if label is None:
        label = _UNOWNED[nd] = torch.full((1,) * nd, NONE, dtype=torch.int64)
    return label


def is_unowned_label(label: torch.Tensor) -> bool:
    """True if ``label`` is the shared label `unowned` returns (a cheap identity test)."""
    return label is _UNOWNED.get(label.dim())


# -- modules ------------------------------------------------------------------------------------


def with_keywords(module: nn.Module, values, kwargs, labs, klabs):
    """A layer's inputs given by keyword (``attn(query=q, key=k, value=v)``, ``conv(input=x)``)
    appended to the positional ones in the order of its forward's parameters."""
    if not kwargs:
        return list(values), list(labs)
    try:
        order = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        order = []
    names = sorted(kwargs, key=lambda k: order.index(k) if k in order else len(order))
    return [*values, *(kwargs[k] for k in names)], [*labs, *(klabs.get(k) for k in names)]


def _derived_tensors(module: nn.Module) -> bool:
    """True if the layer's weight or bias is computed rather than held (``weight_norm``, a
    parametrization): removal would slice the computed tensor, not what it is computed from."""
    if "parametrizations" in module._modules:
        return True
    attributes = module.__dict__  # (not getattr: nn.Module's __getattr__ costs µs per missing name)
    for tensor in ("weight", "bias"):  # the old weight_norm sets a plain tensor attribute per call
        if tensor not in module._parameters and isinstance(attributes.get(tensor), torch.Tensor):
            return True
    return False


def module_rule(tracer, name: str, module: nn.Module, args, values, out) -> Any:
    result = _module_rule(tracer, name, module, args, values, out)
    if _derived_tensors(module):
        reason = f"{type(module).__name__} {name!r} computes its weight (weight_norm, a parametrization)"
        tracer.freeze_all(args, reason)
        tracer.freeze_all(result, reason)
        for (member_module, _, _), ids in tracer.members.items():
            if member_module == name:
                tracer.labels.freeze(ids, reason)
    return result


def _module_rule(tracer, name: str, module: nn.Module, args, values, out) -> Any:
    """A layer's entry in torchprune/layer_types.py labels it; a module that is an op (an
    activation, pooling, flatten, softmax) is labelled like its functional form; anything else
    freezes what reaches it."""
    entry = layer_types.lookup(type(module))
    if entry is not None:
        return entry.couple(tracer, entry, name, module, args, values, out)
    x, label = (values[0], args[0]) if values else (None, None)
    if isinstance(module, _ELEMENTWISE_MODULES):
        return label
    if isinstance(module, nn.Softmax):
        tracer.labels.check(label, module.dim if module.dim is not None else -1, f"softmax over channels in {name!r}")
        return label
    if isinstance(module, _POOL_MODULES):
        return pool(tracer, label, x, out, name)
    if isinstance(module, nn.Flatten):
        return compress(torch.flatten(full(label, x), module.start_dim, module.end_dim))
    if isinstance(module, nn.Upsample):  # F.interpolate as a module (and UpsamplingNearest2d, ...)
        return spatial(tracer, label, x, range(2, x.dim()), out, "upsampling", name)
    # torch's own layers without a rule here, or a submodule traced as one opaque call
    return layer_types.freeze_layer(tracer, name, module, args, out)


def pool(tracer, label, x, out, where: str):
    """Pooling mixes positions within each channel: the spatial dims must not be pruned."""
    for d in range(2, x.dim()):
        tracer.labels.check(label, d, f"pooling at {where!r} over a pruned dim")
    shape = list(label.shape)
    for d in range(2, x.dim()):
        shape[d] = 1
    return label[tuple(slice(0, s) for s in shape)].contiguous()


# -- functions and methods ----------------------------------------------------------------------


def elementwise(tracer, operands, values, out, where: str) -> torch.Tensor:
    """Operands of an elementwise op share positions; an owned position facing an unowned tensor
    (a constant buffer, a model input) of real extent along its dims cannot be removed. (In numpy:
    a residual add or a gate is labelled with a dozen small-array ops, several times cheaper.)"""
    pairs = [(lab, v) for lab, v in zip(operands, values) if is_tensor(v) and lab is not None]
    if not pairs:
        return unowned(out)
    labels, nd = tracer.labels, out.dim()
    first = pairs[0][0]
    if len(pairs) == 1:  # a tensor and Python numbers: nothing to unify, nothing faces it
        return at_rank(first, nd)
    if len(pairs) == 2:
        # the common case (a residual add, a gate): if both are owned everywhere, they are unified
        # position by position, so either label names the output's units; the smaller one is kept
        # (a ViT's residual stream, labelled per token by its position table, takes the next
        # projection's one id per channel, and every later op works on 384 ids, not 197 x 384)
        a, b = first.numpy(), pairs[1][0].numpy()
        if (a >= 0).all() and (b >= 0).all():
            labels.unify_arrays(a, b)  # (numpy broadcasting lines up labels of fewer dims)
            return at_rank(pairs[1][0] if b.size < a.size else first, nd)
    labs = [at_rank(lab, nd).numpy() for lab, _ in pairs]
    shapes = [(1,) * (nd - v.dim()) + tuple(v.shape) for _, v in pairs]
    owned = [bool((lab >= 0).all()) for lab in labs]
    for i in range(len(labs)):
        for j in range(len(labs)):
            if i < j:
                labels.unify_arrays(labs[i], labs[j])
            if i == j or owned[j]:  # nothing unowned faces operand i
                continue
            a, b = np.broadcast_arrays(labs[i], labs[j])
            facing = (a >= 0) & (b < 0)
            if facing.any() and any(a.shape[d] > 1 and shapes[j][d] > 1 for d in range(nd)):
                labels.freeze(torch.from_numpy(np.ascontiguousarray(a[facing])),
                              f"elementwise op at {where!r} with an unpruned tensor")
    result = np.broadcast_arrays(*labs)[0]
    if not owned[0]:  # positions the first operand does not own take the others' ids
        for lab in labs[1:]:
            result = np.where(result >= 0, result, lab)
    return compress(torch.from_numpy(np.ascontiguousarray(result)))


def matmul(tracer, a_lab, b_lab, a, b, out, where: str) -> torch.Tensor:
    """a @ b. If either operand's labels vary along the contracted dim k, removing position k
    removes a's column k and b's row k together. The output keeps a's row labels and b's column
    labels where they do not vary along k (attn @ v keeps v's channels)."""
    labels = tracer.labels
    if a.dim() < 2 or b.dim() < 2:
        tracer.freeze_all([a_lab, b_lab], f"matmul with a vector at {where!r}")
        return unowned(out)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    A = a_lab.expand(a.shape).expand(*batch, *a.shape[-2:])
    B = b_lab.expand(b.shape).expand(*batch, *b.shape[-2:])
    a_const = A.amin(-1) == A.amax(-1)  # (..., n): row labels do not depend on k
    b_const = B.amin(-2) == B.amax(-2)  # (..., m)
    if not bool(a_const.all()) or not bool(b_const.all()):
        a_k = A.max(dim=-2).values  # the column k of a goes as one
        b_k = B.max(dim=-1).values
        labels.unify(A, a_k.unsqueeze(-2))
        labels.unify(B, b_k.unsqueeze(-1))
        labels.unify(a_k, b_k)
        mismatch = (a_k >= 0) != (b_k >= 0)
        if mismatch.any():
            labels.freeze(torch.cat([a_k[mismatch], b_k[mismatch]]),
                          f"matmul at {where!r} contracts owned with unowned positions")
    rows = torch.where(a_const, A[..., 0], torch.full_like(A[..., 0], NONE)).unsqueeze(-1)
    cols = torch.where(b_const, B[..., 0, :], torch.full_like(B[..., 0, :], NONE)).unsqueeze(-2)
    both = (rows >= 0) & (cols >= 0)
    if both.any():
        r, c = torch.broadcast_tensors(rows, cols)
        labels.freeze(torch.cat([r[both], c[both]]), f"matmul at {where!r} with labels on both rows and columns")
    return compress(torch.where(rows >= 0, rows, cols))


def reduce(tracer, kind: str, label, x, out, dims, keepdim: bool, where: str) -> torch.Tensor:
    if kind == "sum" and dims is None:
        # a sum of everything: a scalar; its check waits until it is used (``if x.sum() > 0``, control
        # flow the run sees once, leaves the channels alone; ``y * x.sum()`` pins them)
        if label is not None and (label.numpy() >= 0).any():
            tracer.defer_checks(out, [(label, d, f"sum over a pruned dim at {where!r}") for d in range(x.dim())])
        return unowned(out)
    if dims is None:
        dims = list(range(x.dim()))
    dims = [d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)]
    lab = at_rank(label, x.dim())
    for d in dims:
        # (a sum along a dim too: a removed position adds nothing, a zeroed one adds whatever the ops
        # after its layer make of 0, sigmoid(0) or a constant added, so the positions summed go together)
        tracer.labels.check(label, d, f"{kind} over a pruned dim at {where!r}")
    for d in sorted(dims, reverse=True):
        if lab.shape[d] > 1:
            lab = lab.amax(d, keepdim=keepdim)  # any owner of the slice: checked or summed
        elif not keepdim:  # the label is constant along d: nothing to reduce
            lab = lab.squeeze(d)
    return compress(lab)


# -- functional forms of layers (a custom module calling F.batch_norm with its own tensors) ------------


def per_channel(tracer, ids: torch.Tensor, operands, values, where: str) -> None:
    """Tensors applied channel by channel (a norm's weight, bias, running statistics): index i of
    each goes with channel i, so their ids are unified with the channels' (a parameter or buffer of
    the model then becomes a member, see graph.py). A channel facing a tensor no unit owns (built in
    forward) cannot be removed, nor an index of a parameter facing a channel no unit owns."""
    a = ids.numpy()
    for lab, value in zip(operands, values):
        if not is_tensor(value) or lab is None:
            continue
        b = lab.numpy().reshape(-1)
        if b.shape[0] != a.shape[0]:
            b = np.broadcast_to(b, a.shape)
        tracer.labels.unify_arrays(a, b)
        mixed = (a >= 0) != (b >= 0)
        if mixed.any():
            tracer.labels.freeze(torch.from_numpy(np.concatenate([a[mixed], b[mixed]])),
                                 f"{where} with an unpruned tensor")


def _tensor_operands(args, kwargs, labs, klabs, skip: int):
    """The labels and values of the tensors among ``args[skip:]`` and ``kwargs``."""
    operands = [*labs[skip:], *(klabs.get(k) for k in kwargs)]
    values = [*args[skip:], *kwargs.values()]
    return [lab for lab, v in zip(operands, values) if is_tensor(v)], [v for v in values if is_tensor(v)]


def batch_norm(tracer, args, kwargs, labs, klabs, out, where: str) -> torch.Tensor:
    """``F.batch_norm`` / ``torch.batch_norm``: like a BatchNorm layer, each channel (dim 1) on its
    own; the running statistics, weight and bias go with the channels (in either signature's order)."""
    x, label = args[0], labs[0] if is_tensor(labs[0]) else unowned(args[0])
    where = f"batch_norm at {where!r}"
    ids = tracer.labels.reduce_to_dim(label, 1, x.shape, where)
    per_channel(tracer, ids, *_tensor_operands(args, kwargs, labs, klabs, 1), where)
    return label


def layer_norm(tracer, args, kwargs, labs, klabs, out, where: str) -> torch.Tensor:
    """``F.layer_norm`` / ``torch.layer_norm``: like an nn.LayerNorm, over the last dim with a weight
    its channels go (inexact: it normalizes over them) with the weight and bias; over several dims
    or without a weight its channels stay."""
    x, label = args[0], labs[0] if is_tensor(labs[0]) else unowned(args[0])
    shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    operands, values = _tensor_operands(args, kwargs, labs, klabs, 2)
    labels, where = tracer.labels, f"layer_norm at {where!r}"
    if len(shape) != 1 or weight is None:
        reason = f"{where} over several dims or without affine weights"
        for d in range(1, len(shape) + 1):
            labels.freeze(labels.reduce_to_dim(label, -d, x.shape, reason), reason)
        tracer.freeze_all(operands, reason)
        return label
    ids = labels.reduce_to_dim(label, -1, x.shape, where)
    labels.inexact(ids, f"{where} normalizes over these channels")
    per_channel(tracer, ids, operands, values, where)
    return label


def group_norm(tracer, args, kwargs, labs, klabs, out, where: str) -> torch.Tensor:
    """``F.group_norm`` / ``torch.group_norm``: like an nn.GroupNorm, channel j of every group is one
    unit (inexact: it normalizes over its group), the weight and bias go with the channels."""
    x, label = args[0], labs[0] if is_tensor(labs[0]) else unowned(args[0])
    groups = args[1] if len(args) > 1 else kwargs["num_groups"]
    labels, where = tracer.labels, f"group_norm at {where!r}"
    ids = labels.reduce_to_dim(label, 1, x.shape, where)
    layer_types.same_in_every_group(labels, ids, groups, where)
    labels.inexact(ids, f"{where} normalizes over these channels")
    per_channel(tracer, ids, *_tensor_operands(args, kwargs, labs, klabs, 2), where)
    return label


def embedding(tracer, args, kwargs, labs, klabs, out, where: str) -> torch.Tensor:
    """``F.embedding(indices, weight)`` / ``torch.embedding(weight, indices)``: like an nn.Embedding,
    the output's last dim has the weight's columns (dim 1); the indices are not channels."""
    if args and is_tensor(args[0]) and args[0].is_floating_point():  # torch.embedding(weight, indices)
        weight, label, indices = args[0], labs[0], labs[1:]
    else:
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        label = labs[1] if len(labs) > 1 else klabs.get("weight")
        indices = [*labs[:1], klabs.get("input")]
    where = f"embedding at {where!r}"
    tracer.freeze_all(indices, f"the indices of {where}")
    label = label if is_tensor(label) else unowned(weight)
    ids = tracer.labels.reduce_to_dim(label, 1, weight.shape, where)
    return layer_types.channel_label(ids, out.dim(), out.dim() - 1)


#: ``input + value * t1 * t2`` (or ``/ t2``): elementwise over three operands.
ELEMENTWISE3 = {torch.addcmul, torch.addcdiv}
ELEMENTWISE3_METHODS = {"addcmul", "addcmul_", "addcdiv", "addcdiv_"}


def spatial(tracer, lab: torch.Tensor, x: torch.Tensor, dims, out, what: str, where: str) -> torch.Tensor:
    """An op that resizes only ``dims`` of ``x`` (F.pad's last dims, F.interpolate's spatial ones)
    and leaves every other dim as it is: the label passes unchanged when no unit varies along
    ``dims`` (the channels lie elsewhere); otherwise the op moves pruned positions, so they are
    frozen and the output is unowned."""
    if lab.dim() != x.dim() or any(lab.shape[d] > 1 for d in dims):
        tracer.freeze_all([lab], f"{what} of a pruned dim at {where!r}")
        return unowned(out)
    return lab


def pad(tracer, args, kwargs, labs, klabs, out, where: str) -> torch.Tensor:
    """``F.pad(x, pad)``: pads the last len(pad) / 2 dims."""
    x, lab = args[0], labs[0] if is_tensor(labs[0]) else unowned(args[0])
    widths = args[1] if len(args) > 1 else kwargs["pad"]
    return spatial(tracer, lab, x, range(x.dim() - len(widths) // 2, x.dim()), out, "pad", where)


def interpolate(tracer, args, kwargs, labs, klabs, out, where: str) -> torch.Tensor:
    """``F.interpolate(x, ...)``: resamples the dims after the batch and channel dims."""
    x, lab = args[0], labs[0] if is_tensor(labs[0]) else unowned(args[0])
    return spatial(tracer, lab, x, range(2, x.dim()), out, "interpolate", where)


#: The functional forms of layers with a rule: each labels the call like the layer.
LAYER_FUNCTIONS = {
    F.batch_norm: batch_norm, torch.batch_norm: batch_norm, F.layer_norm: layer_norm, torch.layer_norm: layer_norm,
    F.embedding: embedding, torch.embedding: embedding, F.group_norm: group_norm, torch.group_norm: group_norm,
    F.pad: pad, F.interpolate: interpolate,
}


def substitute(value, env: Callable):
    """``value`` with every tensor replaced by env(tensor) (nested in lists and tuples)."""
    if isinstance(value, (list, tuple)):
        return type(value)(substitute(v, env) for v in value)
    return env(value) if is_tensor(value) else value


SHAPE_FUNCTIONS = _SHAPE_FUNCTIONS
SHAPE_METHODS = _SHAPE_METHODS
UNARY, UNARY_METHODS, BINARY, BINARY_METHODS = _UNARY, _UNARY_METHODS, _BINARY, _BINARY_METHODS
POOL_FUNCTIONS, REDUCE_METHODS, REDUCE_FUNCTIONS = _POOL_FUNCTIONS, _REDUCE_METHODS, _REDUCE_FUNCTIONS
