"""Labelling every value's channels (rules.py says how): by one recorded run, or by torch.fx.

`trace` labels one recorded run of the model on the example inputs (record.py). Where a layer
did not run on them, `trace_fx` traces the model symbolically (``torch.fx``, which sees every
path) and runs the resulting graph on the example inputs with an fx Interpreter, so every rule
sees real shapes and size arguments; submodules that fx cannot trace become opaque calls. The
model runs in eval mode under no_grad; its train/eval flags are restored afterwards.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Dict

import torch
from torch import fx

from ... import layer_types
from ...masking import is_prunable
from ...nn.attention import PrunedMultiheadAttention
from ...state import preserved_state
from . import rules
from .record import Unrun, record
from .recorder import LabelRecorder, Member

__all__ = ["Member", "Tracer", "trace", "trace_fx"]

_MISSING = object()


class Tracer(LabelRecorder, fx.Interpreter):
    """Runs the traced graph and labels each node's output (recorder.py labels each call)."""

    method = "torch.fx"

    def __init__(self, model: torch.nn.Module, graph: fx.Graph):
        fx.Interpreter.__init__(self, model, graph=graph)
        LabelRecorder.__init__(self)
        self.named_tensors = {name for name, _ in (*model.named_parameters(remove_duplicate=False),
                                                   *model.named_buffers(remove_duplicate=False))}
        self.env_labels: Dict[fx.Node, Any] = {}

    def run(self, *inputs) -> Any:
        """fx.Interpreter.run without its per-node bookkeeping (a few µs a node: 0.6 ms of the
        benchmark's ResNet); values are freed after their last use, as there."""
        env, given = self.env, iter(inputs)
        modules = self.submodules  # fx.Interpreter's dict(named_modules())
        for node in self.graph.nodes:
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            op = node.op
            if op == "placeholder":
                out = list(given) if str(node.target).startswith("*") else next(given, _MISSING)
                if out is _MISSING:
                    if not args:
                        raise ValueError(f"`example_inputs` gives no value for the model's argument {node.target!r}")
                    out = args[0]  # the argument's default
            elif op == "get_attr":
                out = self.fetch_attr(node.target)
            elif op == "call_module":
                module = modules.get(node.target)
                out = (self.fetch_attr(node.target) if module is None else module)(*args, **kwargs)
            elif op == "call_function":
                out = node.target(*args, **kwargs)
            elif op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:  # output
                out = args[0]
            env[node] = out
            self.env_labels[node] = self._label(node, out, args, kwargs)
            for gone in self.user_to_last_uses.get(node, ()):
                del env[gone]
            if op == "output":
                return out

    def _labels_of(self, args):
        return fx.node.map_aggregate(args, lambda a: self.env_labels.get(a) if isinstance(a, fx.Node) else None)

    def _label(self, node: fx.Node, out, args, kwargs):
        if node.op == "placeholder":
            return self.unowned_like(out)
        if node.op == "get_attr":
            if not isinstance(out, torch.Tensor):
                return None
            if node.target not in self.named_tensors:
                # a constant fx made while tracing (``torch.tensor(1.0)``, or a buffer indexed, which
                # fx does not trace: ``self.buf[None, :, None, None]``): not the model's, so unowned
                return self.unowned_like(out)
            return self.parameter(node.target, out)
        if node.op == "output":
            self.freeze_all(self._labels_of(node.args), "reaches the model output")
            return None
        labs = self._labels_of(node.args)
        if node.op == "call_module":
            module = self.submodules.get(node.target)
            module = self.fetch_attr(node.target) if module is None else module
            values, labs = rules.with_keywords(module, args, kwargs, labs, self._labels_of(node.kwargs))
            return rules.module_rule(self, node.target, module, labs, values, out)
        method = node.target if node.op == "call_method" else None
        return self.function(node.target, method, args, kwargs, labs, self._labels_of(node.kwargs), out, node.name,
                             used=bool(node.users))


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, with our own layers kept whole like torch's: masked layers (a weight-pruned
    nn.Linear is still an nn.Linear), PrunedMultiheadAttention and the layer types registered in
    torchprune/layer_types.py; plus ``opaque`` modules."""

    def __init__(self, opaque=frozenset()):
        super().__init__()
        self.opaque = opaque
        self.failed_in = None  # the innermost submodule whose forward could not be traced
        self._is_prunable, self._attention = is_prunable, PrunedMultiheadAttention

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = m
            raise

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if id(m) in self.opaque or isinstance(m, self._attention) or self._is_prunable(m) \
                or layer_types.is_registered(type(m)):
            return True
        return super().is_leaf_module(m, qualname)


@functools.lru_cache(maxsize=None)
def _leaf_tracer() -> _LeafTracer:
    return _LeafTracer()


def _is_leaf(m: torch.nn.Module, qualname: str) -> bool:
    """`_LeafTracer.is_leaf_module` without building a tracer per call (fx collects math's functions for each)."""
    return _leaf_tracer().is_leaf_module(m, qualname)


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


def trace(model: torch.nn.Module, example_inputs: tuple) -> LabelRecorder:
    """Labels one recorded run of ``model`` on the example inputs (record.py): the same groups as
    a symbolic trace wherever torch.fx can trace the model, for about two thirds of the time (no
    symbolic trace before the labelled run). If a layer did not run on the example inputs, the
    run cannot say how it connects: torch.fx's symbolic trace, which sees every path, labels the
    model instead (`trace_fx`)."""
    try:
        return record(model, example_inputs, _is_leaf)
    except Unrun as unrun:
        return trace_fx(model, example_inputs, unrun)


def _untouched(graph: fx.Graph, names) -> list:
    """The module names among ``names`` that no node of ``graph`` calls or reads a tensor of."""
    targets = [n.target for n in graph.nodes if n.op in ("call_module", "get_attr")]
    return [name for name in names
            if not any(t == name or t.startswith(name + ".") for t in targets) and not name.startswith("(")]


def _with_training_paths(model: torch.nn.Module, graph: fx.Graph, opaque, unrun) -> fx.Graph:
    """The graph that covers the modules that did not run: a model traced in eval mode leaves out
    the paths it takes only in training (GoogLeNet's and Inception's auxiliary classifiers), whose
    layers read channels that pruning removes; traced in train mode, those paths are in the graph and
    their layers are labelled (the labelled run still runs in eval mode). Modules that neither graph
    reaches are named in a warning: how they connect is unknown."""
    missing = _untouched(graph, unrun)
    if missing and not model.training:
        before = set(vars(model))
        with preserved_state(model):
            model.train()
            try:
                training_graph = _LeafTracer(opaque).trace(model)
            except Exception:
                training_graph = None
        if training_graph is not None and len(_untouched(training_graph, unrun)) < len(missing):
            dropped, graph, missing = graph, training_graph, _untouched(training_graph, unrun)
            added = {n.target for n in dropped.nodes if n.op == "get_attr"}  # the first trace's constants
        else:
            added = set(vars(model)) - before
        for key in added:
            if isinstance(key, str) and key.startswith("_tensor_constant") and key in vars(model):
                delattr(model, key)
    if missing:
        warnings.warn(f"these modules neither ran on `example_inputs` nor appear in torch.fx's trace: {missing}; "
                      "they are not pruned, and if they read channels that are, they will fail: pass inputs on "
                      "which they run", stacklevel=2)
    return graph


def _fx_failure(model: torch.nn.Module, error: Exception) -> str:
    """Why torch.fx failed, in words: a forward behind a decorator (transformers' ``can_return_tuple``,
    ``deprecate_kwarg``: ``wrapper(*args, **kwargs)``) fails inside fx with an internal error such as
    "co_varnames is too small", which the message names as what it is."""
    forward = type(model).forward
    if inspect.unwrap(forward) is not forward:
        return (f"{type(model).__name__}.forward is wrapped by a decorator, which torch.fx cannot trace through: "
                f"{type(error).__name__}: {error}")
    return f"{type(error).__name__}: {error}"


def trace_fx(model: torch.nn.Module, example_inputs: tuple, unrun=None) -> LabelRecorder:
    """Symbolically traces ``model`` and labels it by running the example inputs through its graph;
    submodules fx cannot trace become opaque calls. If fx cannot trace the model's own forward:
    the `Unrun` error of a recorded run (``unrun``) is raised, or without one the run is recorded."""
    def fallback(error):
        if unrun is None:
            return record(model, example_inputs, tracer.is_leaf_module)
        raise ValueError(
            f"`model` could not be traced with torch.fx ({_fx_failure(model, error)}), and in the run on "
            f"`example_inputs` that replaces the trace, these modules did not run: {unrun.modules}. How their channels "
            "connect to the rest is unknown, so nothing is pruned: pass example inputs on which every module runs, or "
            "remove the unused ones"
        ) from None

    tracer, opaque = _LeafTracer(), frozenset()
    try:
        graph = tracer.trace(model)
    except Exception as error:
        if tracer.failed_in is None:  # the model's own forward, not a submodule, stopped fx
            return fallback(error)
        opaque = frozenset(_untraceable(model))
        try:
            graph = _LeafTracer(opaque).trace(model)
        except Exception as error:
            return fallback(error)
    if unrun is not None:
        graph = _with_training_paths(model, graph, opaque, unrun.modules)
    tracer = Tracer(model, graph)  # the interpreter runs the graph against the model itself
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            tracer.run(*example_inputs)
    finally:  # the constants fx's trace set on the model (``_tensor_constant0``) go again
        for node in graph.nodes:
            if node.op == "get_attr" and node.target not in tracer.named_tensors and "." not in node.target \
                    and node.target.startswith("_tensor_constant") and node.target in vars(model):
                delattr(model, node.target)
    tracer.tie_shared(dict(model.named_modules()))
    tracer.labels.resolve()
    return tracer
