"""Running a model once under torch.fx and labelling every value's channels (rules.py says how).

The model is traced symbolically (``torch.fx.symbolic_trace``) and the resulting graph is run on
the example inputs by an fx Interpreter, so every rule sees real shapes and real size arguments.
The model runs in eval mode under no_grad; its train/eval flags are restored afterwards.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import fx

from ..calibration import preserved_state
from . import rules
from .labels import Labels, compress

Member = Tuple[str, str, int]  # (module name, tensor name, dim)


class SizeRef:
    """A tensor's ``.shape`` / ``.size()``: reading one of its entries pins that dim's size."""

    def __init__(self, label: torch.Tensor):
        self.label = label


def _reads_all(labels: Labels, ref: SizeRef, where: str) -> None:
    for d in range(ref.label.dim()):
        labels.check(ref.label, d, f"the size of a pruned dim is read at {where!r}")


class Tracer(fx.Interpreter):
    """Runs the traced graph and labels each node's output."""

    def __init__(self, model: torch.nn.Module, graph: fx.Graph):
        super().__init__(model, graph=graph)
        self.labels = Labels()
        self.members: Dict[Member, torch.Tensor] = {}
        self.positional: Dict[str, torch.Tensor] = {}
        self.attention: Dict[str, torch.nn.Module] = {}
        self.env_labels: Dict[fx.Node, Any] = {}

    # -- helpers used by the rules ---------------------------------------------------------

    def member(self, module: str, tensor: str, dim: int, ids: torch.Tensor) -> None:
        """Records that index i along ``dim`` of ``module.tensor`` carries id ``ids[i]``; a module
        called twice must see the same channels both times."""
        key = (module, tensor, dim)
        if key in self.members:
            old = self.members[key]
            self.labels.unify(old, ids)
            mixed = (old >= 0) != (ids >= 0)
            if mixed.any():
                self.labels.freeze(torch.cat([old[mixed], ids[mixed]]), f"{module!r} is called on different channels")
        else:
            self.members[key] = ids.clone()

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
        if isinstance(value, (list, tuple)):
            return type(value)(self.unowned_like(v) for v in value)
        return None

    def note_attention(self, name: str, module: torch.nn.Module) -> None:
        self.attention[name] = module

    # -- the interpreter ---------------------------------------------------------------------

    def run_node(self, node: fx.Node) -> Any:
        out = super().run_node(node)
        self.env_labels[node] = self._label(node, out)
        return out

    def _labels_of(self, args):
        return fx.node.map_aggregate(args, lambda a: self.env_labels.get(a) if isinstance(a, fx.Node) else None)

    def _label(self, node: fx.Node, out):
        if node.op == "placeholder":
            return self.unowned_like(out)
        if node.op == "get_attr":
            if not isinstance(out, torch.Tensor):
                return None
            ids = self.labels.fresh(list(out.shape))
            self.positional[node.target] = ids
            return ids
        if node.op == "output":
            self.freeze_all(self._labels_of(node.args), "reaches the model output")
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        labs = self._labels_of(node.args)
        klabs = self._labels_of(node.kwargs)
        if node.op == "call_module":
            module = self.fetch_attr(node.target)
            return rules.module_rule(self, node.target, module, list(labs), list(args), out)
        return self._function(node, node.target, args, kwargs, labs, klabs, out)

    def _function(self, node, target, args, kwargs, labs, klabs, out):
        labels = self.labels
        where = node.name
        method = target if node.op == "call_method" else None
        x = args[0] if args else None
        lab = labs[0] if labs else None

        if target is builtins.getattr:
            return SizeRef(lab) if args[1] == "shape" and isinstance(lab, torch.Tensor) else None
        if method == "size":
            if len(args) > 1 or "dim" in kwargs:
                if node.users:
                    labels.check(lab, args[1] if len(args) > 1 else kwargs["dim"], f"x.size(dim) of a pruned dim at {where!r}")
                return None
            return SizeRef(lab)
        if method in ("dim", "ndimension") or target is builtins.len and isinstance(lab, torch.Tensor):
            if target is builtins.len and node.users:
                labels.check(lab, 0, f"len() of a pruned dim at {where!r}")
            return None
        if target is operator.getitem and isinstance(lab, SizeRef):
            if node.users:
                index = args[1]
                dims = range(lab.label.dim())[index] if isinstance(index, slice) else [index]
                for d in dims:
                    labels.check(lab.label, d, f"the size of a pruned dim is read at {where!r}")
            return None
        if target is operator.getitem and isinstance(lab, (tuple, list)):
            return lab[args[1]]
        if not _has_tensor((args, kwargs)):
            self.freeze_all((labs, klabs), f"{where!r}")
            return None
        if target in rules.UNARY or method in rules.UNARY_METHODS:
            return lab
        if target in rules.BINARY or method in rules.BINARY_METHODS:
            return rules.elementwise(self, [labs[0], labs[1] if len(labs) > 1 else klabs.get("other")], [args[0], args[1] if len(args) > 1 else kwargs.get("other")], out, where)
        if target is torch.where and len(args) == 3:
            return rules.elementwise(self, list(labs), list(args), out, where)
        if target in (operator.matmul, torch.matmul, torch.bmm) or method in ("matmul", "bmm"):
            return rules.matmul(self, labs[0], labs[1], args[0], args[1], out, where)
        if target in (F.softmax, torch.softmax, F.log_softmax, torch.log_softmax) or method in ("softmax", "log_softmax"):
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
            return self._shape_op(node, target, method, args, kwargs, labs, out, where)
        self.freeze_all((labs, klabs), f"{getattr(target, '__name__', target)} at {where!r} has no pruning rule")
        return self.unowned_like(out)

    def _shape_op(self, node, target, method, args, kwargs, labs, out, where):
        """Runs the op itself on the labels, then pins the dims whose sizes are constants."""
        labels = self.labels
        values = {id(v): lab for v, lab in zip(_flat(args), _flat(labs)) if isinstance(v, torch.Tensor)}
        for v in _flat(args):
            if isinstance(v, torch.Tensor) and values.get(id(v)) is None:
                values[id(v)] = rules.unowned(v)

        def env(t):
            return values[id(t)].expand(t.shape).contiguous()

        new_args = rules.substitute(args, env)
        new_kwargs = {k: rules.substitute(v, env) for k, v in kwargs.items()}
        result = getattr(new_args[0], method)(*new_args[1:], **new_kwargs) if method else target(*new_args, **new_kwargs)
        x, lab = args[0], labs[0]
        name = method or getattr(target, "__name__", str(target))
        if name in ("view", "reshape", "expand", "unflatten"):
            sizes = args[1:] if name != "unflatten" else ()
            if name == "unflatten":
                labels.check(lab, args[1] if len(args) > 1 else kwargs["dim"], f"unflatten of a pruned dim at {where!r}")
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
                sizes = sizes[0]
            sizes = sizes or kwargs.get("shape", kwargs.get("size", ()))
            for d, size in enumerate(sizes):
                if size != -1:
                    labels.check(result, d, f"{name} with a fixed size for a pruned dim at {where!r}")
        elif name == "getitem":
            self._check_index(lab, x, args[1], where)
        elif name in ("narrow", "select", "split", "chunk", "unbind", "split_with_sizes"):
            dim = kwargs.get("dim", args[2] if name in ("narrow", "select", "split", "chunk") and len(args) > 2 else 0)
            if name in ("select", "narrow") and len(args) > 1:
                dim = args[1]
            if name == "unbind" and len(args) > 1:
                dim = args[1]
            labels.check(lab, dim, f"{name} along a pruned dim at {where!r}")
        return _compress_all(result)

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


def _has_tensor(tree) -> bool:
    return any(isinstance(v, torch.Tensor) for v in _flat(tree))


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


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, with our own layers kept whole like torch's: masked layers (a weight-pruned
    nn.Linear is still an nn.Linear) and PrunedMultiheadAttention; plus ``opaque`` modules."""

    def __init__(self, opaque=frozenset()):
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        from ..masking import is_prunable
        from .attention import PrunedMultiheadAttention

        if id(m) in self.opaque or isinstance(m, PrunedMultiheadAttention) or is_prunable(m):
            return True
        return super().is_leaf_module(m, qualname)


def _untraceable(model: torch.nn.Module) -> set:
    """Ids of the innermost submodules that torch.fx cannot trace on their own (Python control
    flow on tensor values or shapes): they are traced as opaque calls instead, so the rest of the
    model can still be pruned, and everything that reaches them stays (reported by name)."""
    failing = []
    for name, module in model.named_modules():
        if not name or _LeafTracer().is_leaf_module(module, name):
            continue
        try:
            _LeafTracer().trace(module)
        except Exception:
            failing.append(module)
    ids = {id(m) for m in failing}
    innermost = set()
    for m in failing:
        if not any(id(sub) in ids for sub in m.modules() if sub is not m):
            innermost.add(id(m))
    return innermost


def trace(model: torch.nn.Module, example_inputs: tuple) -> Tracer:
    """Symbolically traces ``model`` and labels it by running the example inputs through it."""
    try:
        try:
            graph = _LeafTracer().trace(model)
        except Exception:
            graph = _LeafTracer(frozenset(_untraceable(model))).trace(model)
    except Exception as error:
        raise ValueError(
            f"`model` could not be traced with torch.fx ({type(error).__name__}: {error}); structural "
            "pruning needs a model whose own forward torch.fx.symbolic_trace accepts (no Python control "
            "flow on tensor values or shapes there; submodules with such control flow are left whole)"
        ) from error
    tracer = Tracer(model, graph)  # the interpreter runs the graph against the model itself
    with preserved_state(model), torch.no_grad():
        model.eval()
        tracer.run(*example_inputs)
    tracer.labels.resolve()
    return tracer
