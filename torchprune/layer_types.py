"""The layer-type table: per layer type, how its channels couple, how it is sliced, how it is scored.

Structured pruning needs three facts about every layer it may cut, and they used to live in three
isinstance ladders (the tracer's rules, the slicer, the channel scorer). Here each layer type has one
`LayerType` entry:

* coupling: ``couple(tracer, entry, name, module, args, values, out)`` labels the layer's output
  and records its *members*, ``(tensor name, dim)`` pairs sliced with its input channels
  (``inputs``) or its output channels (``outputs``); ``channel_dim`` is the dim of the layer's
  input and output values that holds the channels (1 for a conv or a BatchNorm, -1 for a Linear);
* slicing: removal slices the recorded members, then ``resize(module)`` sets the layer's size
  attributes (``in_features``, ``out_channels``, ``num_features``, ...) from the sliced tensors;
* scoring: ``weights`` are the tensors the weight criteria score, ``scale`` the per-channel scale
  "bn_scale" reads, ``output_member`` the member whose indices are the channels of the layer's
  output (the activation criteria hook that output, `output_channel_dim`).

Lookup is by exact type, then along the type's MRO (a masked ``nn.Linear`` is an ``nn.Linear``).
A user layer is registered with `register_layer_type` (the tracer then keeps it whole, as it does
torch's own layers, and its forward may be anything):

>>> from torchprune.layer_types import register_layer_type
>>> register_layer_type(MyLinear, inputs=[("weight", 1)], outputs=[("weight", 0), ("bias", 0)],
...                     resize=lambda m: setattr(m, "width", m.weight.shape[0]))

The coupling functions talk to the tracer (torchprune/structured/tracing) through a small
interface: ``tracer.labels`` (``fresh``, ``unify``, ``freeze``, ``inexact``, ``reduce_to_dim``),
``tracer.member(name, tensor, dim, ids)``, ``tracer.freeze_all(values, reason)``,
``tracer.unowned_like(value)`` and ``tracer.note_attention(name, module)``. Modules that are ops
(activations, dropout, pooling, flatten, softmax) have no tensors to slice or score: the tracer labels
them like their functional forms (tracing/rules.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .nn.attention import PrunedMultiheadAttention

__all__ = [
    "LayerType", "register_layer_type", "lookup", "is_registered", "output_channel_dim", "is_input_member",
    "scale_tensor",
    "is_scorable_weight", "resize", "BATCH_NORMS", "INSTANCE_NORMS", "CHANNEL_NORMS", "NORMS",
]

#: BatchNorm over 1-, 2- and 3-D inputs: what "bn_l1" penalizes and "bn_scale" reads.
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
#: Norms of each channel on its own (dim 1): removing a channel is the same as zeroing it.
CHANNEL_NORMS = BATCH_NORMS + INSTANCE_NORMS
#: Every norm with a per-channel scale ``weight``.
NORMS = CHANNEL_NORMS + (nn.LayerNorm,)

Member = Tuple[str, int]  # (tensor name, dim) within one layer
Couple = Callable[..., Any]


@dataclass(frozen=True)
class LayerType:
    """One layer type's entry (see the module docstring for what each field is used for)."""

    couple: Couple
    channel_dim: int = -1
    inputs: Tuple[Member, ...] = ()
    outputs: Tuple[Member, ...] = ()
    resize: Optional[Callable[[nn.Module], None]] = None
    weights: Tuple[str, ...] = ()
    scale: Optional[str] = None
    output_member: Optional[Member] = None
    #: grouped layers whose groups == in == out channels pass channel c in to channel c out
    depthwise: bool = False


_TABLE: Dict[type, LayerType] = {}
#: Entries of third-party layer types by "module.QualName", so that their library need not be imported.
_BY_NAME: Dict[str, LayerType] = {}


def _own_entry(cls: type) -> Optional[LayerType]:
    """``cls``'s entry: registered with its class, or by its qualified name (third-party layers
    known without importing their library, `_BY_NAME`)."""
    entry = _TABLE.get(cls)
    if entry is None and _BY_NAME:
        entry = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    return entry


def lookup(cls: type) -> Optional[LayerType]:
    """The entry of layer type ``cls``: its own, else that of the nearest registered base class."""
    for base in cls.__mro__:
        entry = _own_entry(base)
        if entry is not None:
            return entry
    return None


def is_registered(cls: type) -> bool:
    """True if ``cls`` itself (not a base) has an entry: the tracer keeps such a layer whole."""
    return _own_entry(cls) is not None


def output_channel_dim(module: nn.Module, tensor: str, dim: int) -> Optional[int]:
    """The dim of ``module``'s output that indexes the channels of its member ``(tensor, dim)``, or
    None when those are not the channels of its output (what the activation criteria hook)."""
    entry = lookup(type(module))
    if entry is None or entry.output_member != (tensor, dim):
        return None
    return entry.channel_dim


def is_input_member(module: nn.Module, tensor: str, dim: int) -> bool:
    """True if ``(tensor, dim)`` of ``module`` is sliced with the channels the layer reads (its
    ``inputs``: a Linear's or conv's weight dim 1, a transposed conv's dim 0), not with channels it
    makes or scales (``exclude`` keeps the latter, see structured/exclusion.py)."""
    entry = lookup(type(module))
    return entry is not None and (tensor, dim) in entry.inputs


def scale_tensor(module: nn.Module) -> Optional[str]:
    """The name of ``module``'s per-channel scale ("bn_scale" scores it), or None."""
    entry = lookup(type(module))
    return None if entry is None else entry.scale


def is_scorable_weight(module: nn.Module, tensor: str, value: torch.Tensor) -> bool:
    """True if the weight criteria score ``module.<tensor>``. A layer type in the table says which
    of its tensors; anything else (a bare parameter, a positional embedding) is scored when it
    has 2 or more dims."""
    entry = lookup(type(module))
    if entry is None:
        return value.dim() >= 2 and tensor != "weight_mask"
    return tensor in entry.weights


def resize(module: nn.Module) -> None:
    """Sets ``module``'s size attributes from its (sliced) tensors; nothing for a type without one."""
    entry = lookup(type(module))
    if entry is not None and entry.resize is not None:
        entry.resize(module)


def register_layer_type(cls: type, *, couple: Union[str, Couple] = "transform", channel_dim: int = -1,
                        inputs: Sequence[Member] = (), outputs: Sequence[Member] = (),
                        resize: Optional[Callable[[nn.Module], None]] = None, weights: Optional[Sequence[str]] = None,
                        scale: Optional[str] = None, output_member: Optional[Member] = None,
                        depthwise: bool = False) -> LayerType:
    """Teaches structured pruning a layer type; returns its entry. The tracer then keeps the layer
    whole (its forward is not traced) and labels it with ``couple``:

    * ``"transform"`` (a Linear-like layer): its input channels along ``channel_dim`` index the
      ``inputs`` members, and it makes new output channels that index the ``outputs`` members
      (a grouped layer, attribute ``groups`` > 1, keeps its channels; torch's grouped convs lose
      the same channels in every group);
    * ``"per_channel"`` (a norm-like layer): its output has its input's channels, which index the
      ``outputs`` members;
    * or a function ``couple(tracer, entry, name, module, args, values, out) -> label`` (see the
      module docstring for the tracer's interface).

    ``resize(module)`` sets its size attributes after slicing. ``weights`` (default: ``("weight",)``
    when a member is named "weight") are what the weight criteria score; ``scale`` is the tensor
    "bn_scale" reads; ``output_member`` (default: the first of ``outputs`` for "transform") is the
    member whose indices are its output's channels, for the activation criteria.

    >>> register_layer_type(MyLinear, inputs=[("weight", 1)], outputs=[("weight", 0), ("bias", 0)])
    >>> tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"`cls` must be a subclass of torch.nn.Module, got {cls!r}")
    rules = {"transform": couple_transform, "per_channel": couple_per_channel}
    if isinstance(couple, str):
        if couple not in rules:
            raise ValueError(f"`couple` must be 'transform', 'per_channel' or a function, got {couple!r}")
        if couple == "transform" and output_member is None and outputs:
            output_member = tuple(outputs[0])
        couple = rules[couple]
    elif not callable(couple):
        raise TypeError(f"`couple` must be 'transform', 'per_channel' or a function, got {type(couple).__name__}")
    inputs, outputs = tuple(tuple(m) for m in inputs), tuple(tuple(m) for m in outputs)
    if weights is None:
        weights = ("weight",) if any(t == "weight" for t, _ in inputs + outputs) else ()
    entry = LayerType(couple, channel_dim, inputs, outputs, resize, tuple(weights), scale,
                      None if output_member is None else tuple(output_member), depthwise)
    _TABLE[cls] = entry
    return entry


# -- coupling -------------------------------------------------------------------------------------


def channel_label(ids: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """The label of a value of ``ndim`` dims whose channels along ``dim`` have ``ids``."""
    shape = [1] * ndim
    shape[dim] = ids.numel()
    return ids.view(shape)


def freeze_layer(tracer, name: str, module: nn.Module, args, out) -> Any:
    """What a layer without a rule does: everything that reaches it stays; its output is unowned."""
    kind = type(module).__name__
    if type(module).__module__.startswith("torch."):
        why = "has no pruning rule"
    else:
        why = "cannot be traced by torch.fx (Python control flow)"
    tracer.freeze_all(args, f"{kind} {name!r} {why}")
    return tracer.unowned_like(out)


def _record(tracer, name: str, module: nn.Module, members: Sequence[Member], ids: torch.Tensor) -> None:
    for tensor, dim in members:
        if getattr(module, tensor, None) is not None:
            tracer.member(name, tensor, dim, ids)


def couple_transform(tracer, entry: LayerType, name: str, module: nn.Module, args, values, out) -> Any:
    """A layer that reads its input's channels and makes new ones (Linear, conv). A depthwise conv
    passes channel c in to channel c out; a grouped conv loses the same channels in every group
    (`same_in_every_group`); a grouped layer of another kind keeps its channels."""
    labels, kind = tracer.labels, type(module).__name__
    dim = entry.channel_dim
    ids = labels.reduce_to_dim(args[0], dim, values[0].shape, f"{kind} {name!r} input")
    groups = getattr(module, "groups", 1)
    if groups == 1:
        _record(tracer, name, module, entry.inputs, ids)
        fresh = labels.fresh([out.shape[dim]])
    elif entry.depthwise and groups == module.in_channels == module.out_channels:
        fresh = ids
    elif entry.depthwise and ids.numel() % groups == 0 and out.shape[dim] % groups == 0:
        # grouped (ResNeXt, RegNet): input channel j of every group is one unit, and so is output
        # channel j of every group, so every group loses the same channels and `groups` stays valid
        _record(tracer, name, module, entry.inputs, same_in_every_group(labels, ids, groups, f"{kind} {name!r}"))
        fresh = labels.fresh([out.shape[dim] // groups]).repeat(groups)
    else:
        reason = f"grouped {kind} {name!r} (groups={groups}) keeps its channels"
        labels.freeze(ids, reason)
        fresh = labels.fresh([out.shape[dim]])
        labels.freeze(fresh, reason)
    _record(tracer, name, module, entry.outputs, fresh)
    return channel_label(fresh, out.dim(), dim % out.dim())


def same_in_every_group(labels, ids: torch.Tensor, groups: int, what: str) -> torch.Tensor:
    """Unifies position j of each of ``groups`` equal groups of ``ids`` (channel j of every group is
    removed with the others or not at all); returns one id per position in a group. A position that
    is fixed in some group and not in another is frozen in all."""
    grid = ids.view(groups, -1)
    labels.unify(grid, grid[:1].expand_as(grid))
    mixed = (grid < 0).any(0) & (grid >= 0).any(0)
    if mixed.any():
        labels.freeze(grid[:, mixed].reshape(-1), f"{what}: a channel is fixed in some of its groups")
    return grid.max(0).values


def couple_standardized(tracer, entry: LayerType, name: str, module: nn.Module, args, values, out) -> Any:
    """A conv whose forward standardizes its weight per output channel over everything it reads
    (timm's StdConv2d, ScaledStdConv2d: ``F.batch_norm`` of the weight, then ``F.conv2d``): coupled
    like a conv; its input channels are inexact, since removing one changes the mean and variance
    the other weights are standardized with (zeroing the input does not)."""
    kind = type(module).__name__
    ids = tracer.labels.reduce_to_dim(args[0], entry.channel_dim, values[0].shape, f"{kind} {name!r} input")
    tracer.labels.inexact(ids, f"{kind} {name!r} standardizes its weight over its input channels")
    return couple_transform(tracer, entry, name, module, args, values, out)


def couple_group_norm(tracer, entry: LayerType, name: str, module: nn.Module, args, values, out) -> Any:
    """GroupNorm: channel j of every group is one unit (the groups stay equal, `num_groups` valid);
    it normalizes over its group's channels, so removal is not the same as zeroing (inexact)."""
    labels, what = tracer.labels, f"GroupNorm {name!r}"
    ids = labels.reduce_to_dim(args[0], 1, values[0].shape, what)
    same_in_every_group(labels, ids, module.num_groups, what)
    labels.inexact(ids, f"{what} normalizes over these channels")
    _record(tracer, name, module, entry.outputs, ids)
    return args[0]


def couple_transposed(tracer, entry: LayerType, name: str, module: nn.Module, args, values, out) -> Any:
    """A transposed conv: its weight is (in, out / groups, ...); a grouped one keeps its channels."""
    labels, kind = tracer.labels, type(module).__name__
    ids = labels.reduce_to_dim(args[0], 1, values[0].shape, f"{kind} {name!r} input")
    fresh = labels.fresh([out.shape[1]])
    if module.groups == 1:
        _record(tracer, name, module, entry.inputs, ids)
        _record(tracer, name, module, entry.outputs, fresh)
    else:
        labels.freeze(ids, f"grouped {kind} {name!r} keeps its channels")
        labels.freeze(fresh, f"grouped {kind} {name!r} keeps its channels")
    return channel_label(fresh, out.dim(), 1)


def couple_per_channel(tracer, entry: LayerType, name: str, module: nn.Module, args, values, out) -> Any:
    """A layer whose output has its input's channels, each scaled on its own (BatchNorm)."""
    ids = tracer.labels.reduce_to_dim(args[0], entry.channel_dim, values[0].shape, f"{type(module).__name__} {name!r}")
    _record(tracer, name, module, entry.outputs, ids)
    return args[0]


def couple_layer_norm(tracer, entry: LayerType, name: str, module: nn.Module, args, values, out) -> Any:
    """LayerNorm over the last dim, with affine weights: its channels go, but it normalizes over
    them, so removing one is not the same as zeroing it (inexact). Over several dims or without
    weights: its channels stay."""
    labels, label, x = tracer.labels, args[0], values[0]
    if len(module.normalized_shape) != 1 or not module.elementwise_affine:
        for d in range(1, len(module.normalized_shape) + 1):
            labels.freeze(labels.reduce_to_dim(label, -d, x.shape, ""),
                          f"LayerNorm {name!r} over several dims or without affine weights")
        return label
    ids = labels.reduce_to_dim(label, -1, x.shape, f"LayerNorm {name!r}")
    labels.inexact(ids, f"LayerNorm {name!r} normalizes over these channels")
    _record(tracer, name, module, entry.outputs, ids)
    return label


def couple_embedding(tracer, entry: LayerType, name: str, module: nn.Module, args, values, out) -> Any:
    """An embedding makes new channels (its columns) from indices."""
    fresh = tracer.labels.fresh([module.embedding_dim])
    _record(tracer, name, module, entry.outputs, fresh)
    return channel_label(fresh, out.dim(), out.dim() - 1)


def couple_recurrent(tracer, entry: LayerType, name: str, module: nn.Module, args, values, out) -> Any:
    """An RNN's input features go with its first layer's input weights; its state stays."""
    x, label = (values[0], args[0]) if values else (None, None)
    if not (isinstance(x, torch.Tensor) and isinstance(label, torch.Tensor) and module.num_layers >= 1):
        return freeze_layer(tracer, name, module, args, out)
    kind = type(module).__name__
    ids = tracer.labels.reduce_to_dim(label, -1, x.shape, f"{kind} {name!r} input")
    for tensor, dim in entry.inputs:
        if hasattr(module, tensor):
            tracer.member(name, tensor, dim, ids)
    if len(values) > 1:
        tracer.freeze_all(args[1:], f"{kind} {name!r} initial state")
    return tracer.unowned_like(out)


def couple_attention(tracer, entry: LayerType, name: str, module: nn.Module, args, values, out) -> Any:
    """Multi-head attention with a packed q/k/v projection. Its input width (the columns of
    in_proj_weight, shared by query, key and value) and its output width (out_proj's rows) are
    channels of the residual stream. Inside, position j of every head's q/k features is one unit
    (q row and k row j of each head: they only meet in the q.k product, and the scale stays), and
    position j of every head's v features another (v row j of each head and out_proj's column
    reading it); all heads lose the same positions, so they stay equal. Heads themselves stay
    (granularity="head" removes them). A pruned nn.MultiheadAttention becomes a
    PrunedMultiheadAttention, whose widths may differ from each other."""
    labels = tracer.labels
    packed = getattr(module, "_qkv_same_embed_dim", True) and getattr(module, "bias_k", None) is None
    if not packed or getattr(module, "add_zero_attn", False) or len(values) < 3:
        tracer.freeze_all(args, f"{type(module).__name__} {name!r} with separate q/k/v projections or extra key/value "
                                "bias keeps its width")
        return tracer.unowned_like(out)
    ids = _attention_input(tracer, name, args, values)
    tracer.member(name, "in_proj_weight", 1, ids)
    tracer.freeze_all(args[3:], f"attention {name!r} masks")
    heads = module.num_heads
    qk = labels.fresh([module.head_dim]).repeat(heads)  # row h * head_dim + j of q (and of k) -> unit j
    v = labels.fresh([getattr(module, "v_head_dim", module.head_dim)]).repeat(heads)
    rows = torch.cat([qk, qk, v])
    tracer.member(name, "in_proj_weight", 0, rows)
    if module.in_proj_bias is not None:
        tracer.member(name, "in_proj_bias", 0, rows)
    prefix = f"{name}.out_proj" if name else "out_proj"
    tracer.member(prefix, "weight", 1, v)
    fresh = labels.fresh([module.out_proj.out_features])
    tracer.member(prefix, "weight", 0, fresh)
    if module.out_proj.bias is not None:
        tracer.member(prefix, "bias", 0, fresh)
    tracer.note_attention(name, module)
    first = out[0]
    return (channel_label(fresh, first.dim(), first.dim() - 1), tracer.unowned_like(out[1]))


def _attention_input(tracer, name: str, args, values) -> torch.Tensor:
    """The ids of the input width, shared by query, key and value (unified; a position owned in
    one and not in another stays)."""
    labels, ids = tracer.labels, None
    for lab, value in zip(args[:3], values[:3]):
        part = labels.reduce_to_dim(lab, -1, value.shape, f"attention {name!r} input")
        if ids is None:
            ids = part
        else:
            labels.unify(ids, part)
            mixed = (ids >= 0) != (part >= 0)
            if mixed.any():
                labels.freeze(torch.cat([ids[mixed], part[mixed]]),
                              f"attention {name!r} query/key/value mix pruned and fixed channels")
    return ids


# -- resizing -------------------------------------------------------------------------------------


def _resize_linear(module: nn.Linear) -> None:
    module.out_features, module.in_features = module.weight.shape


def _resize_conv(module: nn.Module) -> None:
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    module.out_channels = module.weight.shape[0]
    if depthwise:
        module.groups = module.in_channels = module.out_channels
    else:
        module.in_channels = module.weight.shape[1] * module.groups


def _resize_conv_transposed(module: nn.Module) -> None:
    module.in_channels = module.weight.shape[0]
    module.out_channels = module.weight.shape[1] * module.groups


def _resize_channel_norm(module: nn.Module) -> None:
    source = module.weight if module.weight is not None else module.running_mean
    if source is not None:
        module.num_features = source.shape[0]


def _resize_group_norm(module: nn.GroupNorm) -> None:
    if module.weight is not None:
        module.num_channels = module.weight.shape[0]


def _resize_layer_norm(module: nn.LayerNorm) -> None:
    module.normalized_shape = (module.weight.shape[0],)


def _resize_transposed_linear(module: nn.Module) -> None:
    module.nx, module.nf = module.weight.shape


def _resize_embedding(module: nn.Embedding) -> None:
    module.embedding_dim = module.weight.shape[1]


def _resize_recurrent(module: nn.RNNBase) -> None:
    module.input_size = module.weight_ih_l0.shape[1]


def _resize_attention(module: PrunedMultiheadAttention) -> None:
    module.sync_sizes()  # embed_dim, head_dim, v_head_dim


# -- the built-in entries ---------------------------------------------------------------------------

_LINEAR = LayerType(couple_transform, -1, (("weight", 1),), (("weight", 0), ("bias", 0)), _resize_linear, ("weight",),
                    output_member=("weight", 0))
_CONV = replace(_LINEAR, channel_dim=1, resize=_resize_conv, depthwise=True)
_CONV_TRANSPOSED = LayerType(couple_transposed, 1, (("weight", 0),), (("weight", 1), ("bias", 0)),
                             _resize_conv_transposed, ("weight",))
_CHANNEL_NORM = LayerType(couple_per_channel, 1, (),
                          tuple((t, 0) for t in ("weight", "bias", "running_mean", "running_var")),
                          _resize_channel_norm, scale="weight", output_member=("weight", 0))
_ATTENTION = LayerType(couple_attention, -1, (("in_proj_weight", 1),), (("in_proj_weight", 0), ("in_proj_bias", 0)),
                       weights=("in_proj_weight",))

_TABLE[nn.Linear] = _LINEAR
_TABLE.update({cls: _CONV for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)})
_TABLE.update({cls: _CONV_TRANSPOSED for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)})
_TABLE.update({cls: _CHANNEL_NORM for cls in CHANNEL_NORMS})
_TABLE[nn.LayerNorm] = LayerType(couple_layer_norm, -1, (), (("weight", 0), ("bias", 0)), _resize_layer_norm,
                                 scale="weight", output_member=("weight", 0))
_TABLE[nn.Embedding] = LayerType(couple_embedding, -1, (), (("weight", 1),), _resize_embedding, ("weight",))
_TABLE.update({cls: LayerType(couple_recurrent, -1, (("weight_ih_l0", 1), ("weight_ih_l0_reverse", 1)), (),
                              _resize_recurrent, ("weight_ih_l0", "weight_ih_l0_reverse"))
               for cls in (nn.LSTM, nn.GRU, nn.RNN)})
_TABLE[nn.MultiheadAttention] = _ATTENTION
_TABLE[PrunedMultiheadAttention] = replace(_ATTENTION, resize=_resize_attention)
_TABLE[nn.GroupNorm] = LayerType(couple_group_norm, 1, (), (("weight", 0), ("bias", 0)), _resize_group_norm,
                                 scale="weight", output_member=("weight", 0))
# timm's weight-standardized convs (ResNetV2/BiT, NFNet): nn.Conv2d subclasses whose forward computes
# the weight (F.batch_norm over each output channel's weights, then F.conv2d): kept whole and labelled
# as convs, the gain (NFNet's, (out, 1, 1, 1)) going with the outputs
_STANDARDIZED = replace(_CONV, couple=couple_standardized,
                        outputs=_CONV.outputs + (("gain", 0),))
_BY_NAME.update({f"timm.layers.std_conv.{kind}": _STANDARDIZED
                 for kind in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")})
# timm's Linear (its classifiers) and Conv2dSame (TF-ported models): subclasses that call F.linear /
# F.conv2d with their own weight (Conv2dSame after a "same" padding of the spatial dims), so they
# are the layers they subclass
_BY_NAME["timm.layers.linear.Linear"] = _LINEAR
_BY_NAME["timm.layers.conv2d_same.Conv2dSame"] = _CONV
# transformers' Conv1D (GPT-2, GPT, ...): a Linear whose weight is stored (in, out), run as addmm
_BY_NAME["transformers.pytorch_utils.Conv1D"] = LayerType(
    couple_transform, -1, (("weight", 0),), (("weight", 1), ("bias", 0)), _resize_transposed_linear, ("weight",),
    output_member=("weight", 1))
