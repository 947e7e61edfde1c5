"""Labelling one call: which rule of rules.py a torch function or Tensor method goes through.

`LabelRecorder` holds what a trace collects (the `Labels`, the members of each layer, the
positional parameters, the attention modules) and labels one call at a time, whatever recorded
it: the fx Interpreter of fx.py (one call per graph node) or the run recorder of record.py (one
call per torch function seen while the model runs). A call is described the way torch.fx
describes a node: ``target`` (a function, or the method name in ``method``), the real argument
values, their labels, and the real output.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import rules
from .labels import Labels, compress

__all__ = ["LabelRecorder", "Member", "SizeRef"]

Member = Tuple[str, str, int]  # (module name, tensor name, dim)


class SizeRef:
    """A tensor's ``.shape`` / ``.size()``: reading one of its entries pins that dim's size."""

    def __init__(self, label: torch.Tensor):
        self.label = label


def _reads_all(labels: Labels, ref: SizeRef, where: str) -> None:
    for d in range(ref.label.dim()):
        labels.check(ref.label, d, f"the size of a pruned dim is read at {where!r}")


class LabelRecorder:
    """What one trace collects, and the labelling of one call (see the module docstring)."""

    def __init__(self):
        self.labels = Labels()
        self.members: Dict[Member, torch.Tensor] = {}
        self.positional: Dict[str, torch.Tensor] = {}
        self.attention: Dict[str, torch.nn.Module] = {}

    # -- helpers used by the rules ---------------------------------------------------------

    def member(self, module: str, tensor: str, dim: int, ids: torch.Tensor) -> None:
        """Records that index i along ``dim`` of ``module.tensor`` carries id ``ids[i]``; a module
        called twice must see the same channels both times."""
        key = (module, tensor, dim)
        old = self.members.get(key)
        if old is not None:
            if old is ids:
                return
            a, b = old.numpy(), ids.numpy()  # numpy: small vectors, a few µs less than torch per op
            if a.shape != b.shape:
                a, b = np.broadcast_arrays(a, b)
            self.labels.unify_arrays(a, b)
            mixed = (a >= 0) != (b >= 0)
            if mixed.any():
                self.labels.freeze(torch.from_numpy(np.concatenate([a[mixed], b[mixed]])),
                                   f"{module!r} is called on different channels")
        else:
            self.members[key] = ids  # labels are never changed in place

    def tie_shared(self, modules: Dict[str, torch.nn.Module]) -> None:
        """A tensor several layers hold (tied embedding and output weights, one conv weight set on
        two convs) is sliced once per holder: the indices each holder's member removes along a dim
        are unified, so that every holder loses the same ones. (Call before `Labels.resolve`.)"""
        holders: Dict[int, Dict[int, List[torch.Tensor]]] = {}
        names: Dict[int, set] = {}
        for (module, tensor, dim), ids in self.members.items():
            owner = modules.get(module)
            value = None if owner is None else owner._parameters.get(tensor, owner._buffers.get(tensor))
            if value is None:
                continue
            holders.setdefault(id(value), {}).setdefault(dim, []).append(ids)
            names.setdefault(id(value), set()).add(module)
        for key, by_dim in holders.items():
            if len(names[key]) < 2:
                continue
            for vectors in by_dim.values():
                a = vectors[0].numpy()
                for other in vectors[1:]:
                    b = other.numpy()
                    if a.shape != b.shape:
                        continue
                    self.labels.unify_arrays(a, b)
                    mixed = (a >= 0) != (b >= 0)
                    if mixed.any():
                        self.labels.freeze(torch.from_numpy(np.concatenate([a[mixed], b[mixed]])),
                                           f"a tensor shared by {sorted(names[key])} is used on pruned and fixed "
                                           "channels")

    def freeze_all(self, labels, reason: str) -> None:
        if isinstance(labels, (list, tuple)):
            for item in labels:
                self.freeze_all(item, reason)
        elif isinstance(labels, dict):
            self.freeze_all(list(labels.values()), reason)
        elif isinstance(labels, SizeRef):
            _reads_all(self.labels, labels, reason)
        elif isinstance(labels, torch.Tensor):
            self.labels.freeze(labels, reason)

    def unowned_like(self, value):
        if isinstance(value, torch.Tensor):
            return rules.unowned(value)
        if isinstance(value, (list, tuple)):  # (a namedtuple or PackedSequence: a plain list)
            labels = [self.unowned_like(v) for v in value]
            return type(value)(labels) if type(value) in (list, tuple) else labels
        return None

    def defer_checks(self, value, checks) -> None:
        """Checks that apply once ``value`` is used (here: at once; the recorded run waits)."""
        for label, dim, reason in checks:
            self.labels.check(label, dim, reason)

    def note_attention(self, name: str, module: torch.nn.Module) -> None:
        self.attention[name] = module

    def parameter(self, qualname: str, value: torch.Tensor) -> torch.Tensor:
        """The ids of a parameter or buffer used outside a layer (a class token, a positional
        embedding): one id per position, the same ones at every use."""
        if value.numel() == 1:  # a learnt scale: nothing of it can be removed, and it faces every channel alike
            return rules.unowned(value)
        ids = self.positional.get(qualname)
        if ids is None or tuple(ids.shape) != tuple(value.shape):
            ids = self.labels.fresh(list(value.shape))
            self.positional[qualname] = ids
        return ids

    # -- one call ----------------------------------------------------------------------------

    def function(self, target, method: Optional[str], args, kwargs, labs, klabs, out, where: str, used: bool = True):
        """The label of ``out``, the result of ``target(*args, **kwargs)`` (or of the Tensor
        method ``method`` with ``args[0]`` as self); ``labs`` / ``klabs`` are the arguments' labels."""
        lab = labs[0] if labs else None
        if target is builtins.getattr or method in ("size", "dim", "ndimension") \
                or target is builtins.len and isinstance(lab, torch.Tensor) \
                or target is operator.getitem and isinstance(lab, (SizeRef, tuple, list)):
            return self._size_or_attribute(target, method, args, kwargs, lab, where, used)
        return self._tensor_function(target, method, args, kwargs, labs, klabs, out, where)

    def _size_or_attribute(self, target, method: Optional[str], args, kwargs, lab, where: str, used: bool):
        """An attribute (``x.shape``, ``x.T``), a size (``x.size(1)``, ``len(x)``, ``x.shape[2]``)
        or an item of a tuple of labels: reading a size pins that dim (when the value is used)."""
        labels = self.labels
        x = args[0] if args else None
        if target is builtins.getattr:
            if not isinstance(lab, torch.Tensor):
                return None
            if args[1] == "shape":
                return SizeRef(lab)
            if args[1] in ("T", "H"):  # every dim reversed
                return compress(lab.expand(x.shape).permute(*reversed(range(x.dim()))))
            if args[1] in ("mT", "mH"):
                return compress(lab.expand(x.shape).transpose(-2, -1))
            return lab if args[1] in ("data", "real") else None
        if method == "size":
            if len(args) > 1 or "dim" in kwargs:
                if used:
                    labels.check(lab, args[1] if len(args) > 1 else kwargs["dim"],
                                 f"x.size(dim) of a pruned dim at {where!r}")
                return None
            return SizeRef(lab)
        if method in ("dim", "ndimension") or target is builtins.len and isinstance(lab, torch.Tensor):
            if target is builtins.len and used:
                labels.check(lab, 0, f"len() of a pruned dim at {where!r}")
            return None
        if target is operator.getitem and isinstance(lab, SizeRef):
            if used:
                index = args[1]
                dims = range(lab.label.dim())[index] if isinstance(index, slice) else [index]
                for d in dims:
                    labels.check(lab.label, d, f"the size of a pruned dim is read at {where!r}")
            return None
        if target is operator.getitem and isinstance(lab, (tuple, list)):
            return lab[args[1]]
        return None

    def _tensor_function(self, target, method: Optional[str], args, kwargs, labs, klabs, out, where: str):
        """The label of the output of a torch function or Tensor method on tensors (rules.py)."""
        labels = self.labels
        x = args[0] if args else None
        lab = labs[0] if labs else None
        if not _has_tensor((args, kwargs)):
            self.freeze_all((labs, klabs), f"{where!r}")
            return None
        if _unowned_only(labs) and _unowned_only(klabs):
            # nothing here is owned (a model input and what is computed from it alone): no rule can
            # unify, freeze or check anything, and the output is unowned too
            return self.unowned_like(out)
        if target in rules.UNARY or method in rules.UNARY_METHODS:
            return lab
        if target in rules.BINARY or method in rules.BINARY_METHODS:
            return rules.elementwise(self, [labs[0], labs[1] if len(labs) > 1 else klabs.get("other")],
                                     [args[0], args[1] if len(args) > 1 else kwargs.get("other")], out, where)
        if target is torch.where and len(args) == 3:
            return rules.elementwise(self, list(labs), list(args), out, where)
        if target in rules.ELEMENTWISE3 or method in rules.ELEMENTWISE3_METHODS:
            return rules.elementwise(self, [*labs[:3], klabs.get("tensor1"), klabs.get("tensor2")],
                                     [*args[:3], kwargs.get("tensor1"), kwargs.get("tensor2")], out, where)
        if target is F.glu:  # a * sigmoid(b) of the two halves a, b = x.chunk(2, dim)
            dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
            halves = x.chunk(2, dim)
            return rules.elementwise(self, list(self._chunk(lab, x, halves, dim, where)), list(halves), out, where)
        if target in (operator.matmul, torch.matmul, torch.bmm) or method in ("matmul", "bmm"):
            return rules.matmul(self, labs[0], labs[1], args[0], args[1], out, where)
        if (target in (F.softmax, torch.softmax, F.log_softmax, torch.log_softmax)
                or method in ("softmax", "log_softmax")):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            labels.check(lab, -1 if dim is None else dim, f"softmax over a pruned dim at {where!r}")
            return lab
        if target in rules.POOL_FUNCTIONS:
            return rules.pool(self, lab, x, out, where)
        if target in rules.REDUCE_FUNCTIONS or method in rules.REDUCE_METHODS:
            kind = rules.REDUCE_FUNCTIONS.get(target, method)
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            return rules.reduce(self, kind, lab, x, out, dims, keepdim, where)
        if target in rules.SHAPE_FUNCTIONS or method in rules.SHAPE_METHODS:
            return self._shape_op(target, method, args, kwargs, labs, out, where, klabs)
        if target in rules.LAYER_FUNCTIONS:
            return rules.LAYER_FUNCTIONS[target](self, args, kwargs, labs, klabs, out, where)
        self.freeze_all((labs, klabs),
                        f"{getattr(target, '__name__', method or target)} at {where!r} has no pruning rule")
        return self.unowned_like(out)

    def _shape_op(self, target, method, args, kwargs, labs, out, where, klabs=None):
        """Runs the op itself on the labels, then pins the dims whose sizes are constants."""
        labels = self.labels
        if args and isinstance(args[0], torch.Tensor) and not _has_tensor(args[1:]) and not _has_tensor(kwargs):
            # the usual case (x.flatten(1), x.view(b, -1), x.transpose(1, 2)): one tensor, the rest sizes
            first = labs[0] if isinstance(labs[0], torch.Tensor) else rules.unowned(args[0])
            new_args, new_kwargs = (first.expand(args[0].shape).contiguous(), *args[1:]), kwargs
        else:
            new_args, new_kwargs = self._label_arguments(target, args, kwargs, labs, klabs, where)
        result = (getattr(new_args[0], method)(*new_args[1:], **new_kwargs) if method
                  else target(*new_args, **new_kwargs))
        x, lab = (args[0], labs[0]) if args else (None, None)
        if lab is None and isinstance(x, torch.Tensor):
            lab = rules.unowned(x)
        name = method or getattr(target, "__name__", str(target))
        # checked on the compressed labels: a dim along which every id is equal needs no check, and
        # a full-size label (197 tokens x 3 x 6 heads x 64 of a ViT's qkv) costs every later step
        result = _compress_all(result)
        if name in ("view", "reshape", "expand", "unflatten"):
            sizes = args[1:] if name != "unflatten" else ()
            if name == "unflatten":
                labels.check(lab, args[1] if len(args) > 1 else kwargs["dim"],
                             f"unflatten of a pruned dim at {where!r}")
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
                sizes = sizes[0]
            sizes = sizes or kwargs.get("shape", kwargs.get("size", ()))
            for d, size in enumerate(sizes):
                if size != -1:
                    labels.check(result, d, f"{name} with a fixed size for a pruned dim at {where!r}")
        elif name == "getitem":
            self._check_index(lab, x, args[1], where)
        elif name == "squeeze" and isinstance(x, torch.Tensor):
            # a pruned dim left with one index would be squeezed away too
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            dims = range(x.dim()) if dims is None else [dims] if isinstance(dims, int) else dims
            for d in dims:
                if x.shape[d] > 1:
                    labels.check(lab, d, f"squeeze of a pruned dim (gone at one channel) at {where!r}")
        elif name == "chunk":
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
            return _compress_all(self._chunk(lab, x, out, dim, where))
        elif name in ("narrow", "select", "split", "unbind", "split_with_sizes"):
            dim = kwargs.get("dim", args[2] if name != "unbind" and len(args) > 2 else 0)
            if name in ("select", "narrow", "unbind") and len(args) > 1:
                dim = args[1]
            why = ("split with fixed sizes (torch.chunk keeps working when channels go)" if name.startswith("split")
                   else name)
            labels.check(lab, dim, f"{why} along a pruned dim at {where!r}")
        return result

    def _label_arguments(self, target, args, kwargs, labs, klabs, where):
        """``args`` and ``kwargs`` of a shape op on several tensors with each tensor replaced by its
        label (an unowned one where it has none), for running the op on the labels."""
        values = {id(v): lab for v, lab in zip(_flat(args), _flat(labs)) if isinstance(v, torch.Tensor)}
        for k, v in kwargs.items():  # torch.cat(tensors=..., dim=1)
            values.update((id(t), lab) for t, lab in zip(_flat(v), _flat((klabs or {}).get(k)))
                          if isinstance(t, torch.Tensor) and values.get(id(t)) is None)
        for v in [*_flat(args), *_flat(kwargs)]:
            if isinstance(v, torch.Tensor) and values.get(id(v)) is None:
                values[id(v)] = rules.unowned(v)

        # x[index] with an integer or bool tensor index (a relative-position table read through an
        # index buffer: BEiT, Swin, LeViT): the index stays as it is, a position to gather, not
        # channels; its own positions cannot be removed
        indices = set()
        if target is operator.getitem:
            for v, lab in zip(_flat(args[1:]), _flat(labs[1:])):
                if isinstance(v, torch.Tensor) and not v.is_floating_point():
                    indices.add(id(v))
                    self.freeze_all([lab], f"the index of x[index] at {where!r}")

        def env(t):
            return t if id(t) in indices else values[id(t)].expand(t.shape).contiguous()

        if target in (torch.cat, torch.concat, torch.stack):
            self._join(target, args, kwargs, values, where)
        return rules.substitute(args, env), {k: rules.substitute(v, env) for k, v in kwargs.items()}

    def _join(self, target, args, kwargs, values, where):
        """``torch.cat`` / ``torch.stack``: every input keeps the others' sizes along each dim but
        the one joined (all dims for a stack), so index i along such a dim goes with index i of
        every other input (cat along the batch dim, a stack then summed)."""
        tensors = [t for t in (args[0] if args else kwargs.get("tensors", ())) if isinstance(t, torch.Tensor)]
        if len(tensors) < 2:
            return
        nd = tensors[0].dim()
        dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
        labs = [values[id(t)] for t in tensors]  # (compressed: size 1 along dims where they do not vary)
        labs = [rules.at_rank(lab, nd) for lab in labs]
        for d in range(nd):
            if target is not torch.stack and d == dim % nd:
                continue
            # (the usual channel cat: labels of size 1 along every other dim, nothing to do)
            if not any(lab.shape[d] > 1 and (lab.amin(d) != lab.amax(d)).any() for lab in labs):
                continue
            reason = f"{getattr(target, '__name__', 'cat')} at {where!r} joins pruned with fixed positions"
            ids = [self.labels.reduce_to_dim(lab, d, t.shape, reason) for lab, t in zip(labs, tensors)]
            for other in ids[1:]:
                self.labels.unify(ids[0], other)
                mixed = (ids[0] >= 0) != (other >= 0)
                if mixed.any():
                    self.labels.freeze(torch.cat([ids[0][mixed], other[mixed]]), reason)

    def _chunk(self, lab, x, pieces, dim, where):
        """The labels of ``x.chunk(n, dim)``. Equal pieces stay equal if position j of every piece
        goes with position j of the first (a GLU gate pairs them anyway), so those are unified;
        unequal pieces (a size not divisible by n) keep their sizes."""
        labels = self.labels
        dim = dim % x.dim()
        lab = rules.unowned(x) if lab is None else lab
        lab = rules.at_rank(lab, x.dim())
        target = [lab.shape[d] if d != dim else x.shape[dim] for d in range(x.dim())]
        parts = lab.expand(*target).chunk(len(pieces), dim) if len(pieces) else ()
        if lab.shape[dim] == 1 or not pieces:
            return tuple(parts)
        if len({p.shape[dim] for p in pieces}) != 1 or len(parts) != len(pieces):
            labels.check(lab, dim, f"chunk into unequal pieces along a pruned dim at {where!r}")
            return tuple(parts)
        first = parts[0]
        for part in parts[1:]:
            labels.unify(first, part)
            a, b = torch.broadcast_tensors(first, part)
            mixed = (a >= 0) != (b >= 0)
            if mixed.any():
                labels.freeze(torch.cat([a[mixed], b[mixed]]), f"chunk at {where!r} pairs pruned with fixed positions")
        return tuple(parts)

    def _check_index(self, lab, x, index, where):
        if not isinstance(index, tuple):
            index = (index,)
        if any(isinstance(i, torch.Tensor) or isinstance(i, (list,)) for i in index):
            self.labels.freeze(lab, f"tensor indexing at {where!r}")
            return
        d = 0
        for i, item in enumerate(index):
            if item is None:
                continue
            if item is Ellipsis:
                d = x.dim() - sum(1 for j in index[i + 1 :] if j is not None)
                continue
            if not (isinstance(item, slice) and item == slice(None)):
                self.labels.check(lab.expand(x.shape), d, f"indexing a pruned dim at {where!r}")
            d += 1


def _unowned_only(labels) -> bool:
    """True if every label in ``labels`` (nested in tuples, lists and dicts) is the shared label of
    an unowned value (`rules.unowned`) or None (a Python value)."""
    if labels is None:
        return True
    if isinstance(labels, torch.Tensor):
        return rules.is_unowned_label(labels)
    if isinstance(labels, (list, tuple)):
        return all(_unowned_only(v) for v in labels)
    if isinstance(labels, dict):
        return all(_unowned_only(v) for v in labels.values())
    return False


def _has_tensor(tree) -> bool:
    if isinstance(tree, torch.Tensor):
        return True
    if isinstance(tree, (list, tuple)):
        return any(_has_tensor(v) for v in tree)
    if isinstance(tree, dict):
        return any(_has_tensor(v) for v in tree.values())
    return False


def _flat(tree) -> List[Any]:
    if isinstance(tree, (list, tuple)):
        return [v for item in tree for v in _flat(item)]
    if isinstance(tree, dict):
        return [v for item in tree.values() for v in _flat(item)]
    return [tree]


def _compress_all(result):
    if isinstance(result, torch.Tensor):
        return compress(result)
    if isinstance(result, (list, tuple)):
        return type(result)(_compress_all(r) for r in result)
    return None
