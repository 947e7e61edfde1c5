"""Tracing by running the model once on the example inputs: how every graph is labelled first.

Every call is recorded as it happens:

* torch's own layers (the modules torch.fx keeps whole: nn.Conv2d, nn.BatchNorm2d,
  nn.MultiheadAttention, masked layers, ...) through forward pre-hooks and hooks: one call with
  its inputs and output;
* every torch function and Tensor method called outside those layers, through a
  ``TorchFunctionMode``: ``torch.cat``, ``x.view``, ``a + b`` (``Tensor.__add__``), ``x.shape``.

Each call goes through the same rules as an fx node (recorder.py), so wherever torch.fx can trace
the model the groups are the same, without the cost of a symbolic trace before a labelled run.
``x.shape`` returns a size that pins dim d when its entry d is read, as a read of ``x.shape[d]``
does under fx. The model itself may have Python control flow on tensor values (``if x.sum() >
0``, a loop with a data-dependent count), which fx cannot trace.

What this sees is the path the example inputs take. A submodule whose forward turns a tensor
value into a Python value (``bool``, ``int``, ``float``, ``.item()``: control flow that fx cannot
trace either) is left whole: its inputs, outputs and layers stay; in the model's own forward, a
branch the inputs do not take is not checked. A layer with parameters or buffers that did not
run raises `Unrun`: its connections are unknown to the run, and fx.py asks torch.fx instead.
"""
from __future__ import annotations

import builtins
import contextlib
import operator
import weakref
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import rules
from .recorder import LabelRecorder, SizeRef

__all__ = ["Recorder", "Unrun", "record"]

# Tensor operators as the fx targets they correspond to; True: the operands come swapped (x.__radd__(y) is y + x).
_OPERATORS = {
    "__add__": (operator.add, False), "__radd__": (operator.add, True), "__iadd__": (operator.iadd, False),
    "__sub__": (operator.sub, False), "__rsub__": (operator.sub, True), "__isub__": (operator.isub, False),
    "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True), "__imul__": (operator.imul, False),
    "__truediv__": (operator.truediv, False), "__rtruediv__": (operator.truediv, True),
    "__itruediv__": (operator.itruediv, False), "__div__": (operator.truediv, False),
    "__matmul__": (operator.matmul, False), "__rmatmul__": (operator.matmul, True),
    "__getitem__": (operator.getitem, False), "__neg__": (operator.neg, False), "__len__": (builtins.len, False),
    "__pow__": (operator.pow, False), "__rpow__": (operator.pow, True), "__ipow__": (operator.ipow, False),
}
# Tensor operators that torch wraps in a Python function under another name.
_WRAPPED_OPERATORS = {torch.Tensor.__pow__: operator.pow}
# Comparisons: a deferred check (see `Recorder.defer_checks`) goes on to their result.
_COMPARE = {"__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__", "gt", "lt", "ge", "le", "eq", "ne",
            "__and__", "__or__", "__invert__", "logical_and", "logical_or", "logical_not", "isnan", "isfinite",
            "all", "any"}
# Calls whose result no channel goes through: one-element tensors made Python numbers, printing, hashing.
_SCALAR = {"__bool__", "__int__", "__float__", "__index__", "__complex__", "item", "__hash__", "__repr__", "__str__",
           "__format__"}
# Of those, the ones through which a tensor's value can steer Python control flow.
_TO_PYTHON = {"__bool__", "__int__", "__float__", "__index__", "__complex__", "item"}


class Unrun(ValueError):
    """A layer with parameters or buffers did not run on the example inputs (``.modules`` names them)."""

    def __init__(self, modules: List[str]):
        super().__init__(f"these modules did not run on `example_inputs`: {modules}")
        self.modules = modules


class _SizeInt(int):
    """One entry of a traced ``x.shape`` (``B, N, C = x.shape``, ``x.shape[-1]``): it pins its dim
    when the model uses it (arithmetic, a comparison, a conversion, formatting, hashing, a torch
    call), and not when it is never used, as ``C`` in timm's attention, which shapes q/k/v from its
    own attributes. CPython reads an int subclass's value directly in ``range(C)``, ``items[C]``,
    ``operator.index(C)`` and ``math.isqrt(C)``: those uses do not pin (docs/guide/structured.md,
    Limits)."""

    def __new__(cls, value: int, pin):
        entry = super().__new__(cls, value)
        entry._pin = pin
        return entry

    def __reduce__(self):  # a copy is a plain int
        return int, (int.__int__(self),)


def _pinning(name: str):
    plain = getattr(int, name)

    def pinned(self, *args):
        self._pin()
        return plain(self, *args)

    pinned.__name__ = name
    return pinned


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__", "__rfloordiv__",
              "__truediv__", "__rtruediv__", "__mod__", "__rmod__", "__divmod__", "__rdivmod__", "__pow__", "__rpow__",
              "__neg__", "__pos__", "__abs__", "__invert__", "__and__", "__rand__", "__or__", "__ror__", "__xor__",
              "__rxor__", "__lshift__", "__rlshift__", "__rshift__", "__rrshift__", "__eq__", "__ne__", "__lt__",
              "__le__", "__gt__", "__ge__", "__index__", "__int__", "__float__", "__bool__", "__hash__", "__round__",
              "__trunc__", "__floor__", "__ceil__", "__str__", "__repr__", "__format__", "bit_length", "bit_count",
              "to_bytes", "as_integer_ratio", "conjugate", "is_integer"):
    if hasattr(int, _name):  # (is_integer: Python 3.12+)
        setattr(_SizeInt, _name, _pinning(_name))


def pin_sizes(value) -> None:
    """Pins every `_SizeInt` in ``value`` (a torch call's arguments: nested tuples, lists, dicts)."""
    if isinstance(value, _SizeInt):
        value._pin()
    elif isinstance(value, (tuple, list)):
        for item in value:
            pin_sizes(item)
    elif isinstance(value, dict):
        for item in value.values():
            pin_sizes(item)


class _Size(tuple):
    """``x.shape`` / ``x.size()`` that pins the dims whose entries the model reads (torch.Size
    cannot be subclassed: this is a tuple with its ``numel``; a slice of it is a torch.Size)."""

    def __new__(cls, sizes, read, label):
        size = super().__new__(cls, sizes)
        size._read, size._label = read, label
        return size

    def _read_all(self):
        for d in range(len(self)):
            self._read(d)

    def __getitem__(self, index):
        if isinstance(index, slice):
            for d in range(len(self))[index]:
                self._read(d)
            return torch.Size(super().__getitem__(index))
        d = range(len(self))[index]  # (an IndexError as a tuple gives)
        return _SizeInt(super().__getitem__(d), lambda: self._read(d))

    def __iter__(self):
        return iter([self[d] for d in range(len(self))])

    def __eq__(self, other):
        self._read_all()
        return tuple(self) == other if not isinstance(other, _Size) else super().__eq__(other)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = tuple.__hash__

    def numel(self) -> int:
        self._read_all()
        return torch.Size(self).numel()


class _Mode(TorchFunctionMode):
    """Hands every torch function called outside torch's layers to the recorder."""

    def __init__(self, recorder: "Recorder"):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        recorder = self.recorder
        if recorder.depth or recorder.busy:
            return func(*args, **kwargs)
        pin_sizes(args)  # a size read from x.shape and handed to torch pins its dim
        pin_sizes(kwargs)
        if getattr(func, "__name__", None) == "__iter__" and args and isinstance(args[0], torch.Tensor):
            return iter(recorder.call(torch.unbind, (args[0], 0), {}, args[0].unbind(0)))
        return recorder.call(func, args, kwargs, func(*args, **kwargs))


class Recorder(LabelRecorder):
    """Labels the calls of one run of the model (see the module docstring)."""

    method = "recorded run"

    def __init__(self, model: nn.Module, leaf):
        super().__init__()
        self.model = model
        self.depth = 0  # > 0 inside one of torch's layers: its own calls are not recorded
        self.busy = False  # True while labelling: the label arithmetic itself is not recorded
        # id(tensor) -> (weak reference to it, label); an entry goes when its tensor is freed, so that
        # the run holds no activations the model itself would free, and a reused id is never misread
        self.values: Dict[int, Tuple[weakref.ref, torch.Tensor]] = {}
        self.modules = dict(model.named_modules())
        self.names = {id(m): name for name, m in self.modules.items()}
        self.leaves = {id(m) for name, m in self.modules.items() if name and leaf(m, name)}
        self.named_tensors = _named_tensors(self.modules)
        self.tensors = {id(t): name for name, t in self.named_tensors.items()}
        self.seen = set()  # ids of parameters and buffers used outside torch's layers
        self.ran = set()  # ids of torch's layers that ran
        self.entered = set()  # ids of the other modules whose forward ran
        self.stack: List[str] = []
        self.mode = None  # the _Mode recording this run, and whether a layer took it off torch's stack
        self.aside = False
        self.branching = set()  # names of submodules whose forward turned a tensor value into a Python value
        # id(value) -> (weak reference, checks) of values whose checks wait until they are used
        self.pending: Dict[int, Tuple[weakref.ref, list]] = {}
        self.carried = None  # a list while a comparison runs: the checks its operands carry to its result

    # -- labels of values ---------------------------------------------------------------------

    def defer_checks(self, value, checks) -> None:
        """The checks of a full sum wait until the sum is used: a comparison carries them on, a
        Python value (``if x.sum() > 0``) drops them, anything else applies them."""
        if isinstance(value, torch.Tensor):
            self.pending[id(value)] = (weakref.ref(value), list(checks))

    def _use(self, value: torch.Tensor) -> None:
        entry = self.pending.pop(id(value), None)
        if entry is None or entry[0]() is not value:
            return
        if self.carried is not None:
            self.carried.extend(entry[1])
        else:
            super().defer_checks(value, entry[1])

    def label_of(self, value):
        if isinstance(value, torch.Tensor):
            if self.pending:
                self._use(value)
            entry = self.values.get(id(value))
            if entry is not None and entry[0]() is value:
                return entry[1]
            qualname = self.tensors.get(id(value))
            if qualname is not None:
                self.seen.add(id(value))
                label = self.parameter(qualname, value)
            else:
                label = rules.unowned(value)  # a model input, or made from constants
            self._keep(value, label)
            return label
        if isinstance(value, _Size):
            return SizeRef(value._label)
        if isinstance(value, (list, tuple)):
            return (type(value)(self.label_of(v) for v in value) if type(value) in (list, tuple)
                    else [self.label_of(v) for v in value])
        if isinstance(value, dict):
            return {k: self.label_of(v) for k, v in value.items()}
        return None

    def _keep(self, value: torch.Tensor, label: torch.Tensor) -> None:
        key, values = id(value), self.values

        def forget(ref):
            if values.get(key, (None,))[0] is ref:
                del values[key]

        values[key] = (weakref.ref(value, forget), label)

    def store(self, value, label) -> None:
        if isinstance(value, torch.Tensor):
            self._keep(value, label if isinstance(label, torch.Tensor) else rules.unowned(value))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                self.store(item, label[i] if isinstance(label, (list, tuple)) and i < len(label) else None)

    def where(self, name: str) -> str:
        return f"{name} in {self.stack[-1]!r}" if self.stack and self.stack[-1] else f"{name} in the model's forward"

    def _size(self, x: torch.Tensor, sizes, where: str):
        label = self.label_of(x)

        def read(d):
            busy, self.busy = self.busy, True  # called from the model's code: the check is not a model op
            try:
                self.labels.check(label, d, f"the size of a pruned dim is read at {where!r}")
            finally:
                self.busy = busy

        return _Size(sizes, read, label)

    # -- calls ----------------------------------------------------------------------------------

    def call(self, func, args, kwargs, out):
        """Labels ``out = func(*args, **kwargs)``; returns ``out`` (a pinning size for ``x.shape``)."""
        self.busy = True
        try:
            return self._call(func, args, kwargs, out)
        finally:
            self.busy = False

    def _call(self, func, args, kwargs, out):
        name = getattr(func, "__name__", str(func))
        if name == "__get__":  # a Tensor attribute
            attr = getattr(getattr(func, "__self__", None), "__name__", None)
            x = args[0]
            if attr == "shape":
                return self._size(x, out, self.where("x.shape"))
            if attr in ("T", "mT", "H", "mH", "data", "real") and isinstance(out, torch.Tensor):
                self._label_call(builtins.getattr, None, (x, attr), {}, out, f"x.{attr}")
            return out
        if name in _SCALAR:
            if self.pending and args and isinstance(args[0], torch.Tensor) and args[0].dtype != torch.bool \
                    and name in _TO_PYTHON and name != "__bool__":
                self._use(args[0])  # ``y * x.sum().item()``: the sum's value goes on as a number
            if name in _TO_PYTHON and self.stack and self.stack[-1]:
                self.branching.add(self.stack[-1])  # a submodule reads a tensor's value into Python
            return out
        method = None
        if func in _WRAPPED_OPERATORS:  # ``x ** 2``: Tensor.__pow__ is a wrapper named "pow"
            func = _WRAPPED_OPERATORS[func]
        elif getattr(torch.Tensor, name, None) is func:
            if name in _OPERATORS:
                func, swapped = _OPERATORS[name]
                if swapped:
                    args = (args[1], args[0], *args[2:])
            else:
                method = name
        if method == "size" and len(args) == 1 and "dim" not in kwargs:
            return self._size(args[0], out, self.where("x.size()"))
        if self.pending and name in _COMPARE:
            self.carried = []
            try:
                self._label_call(method or func, method, args, kwargs, out, name)
            finally:
                carried, self.carried = self.carried, None
            if carried:
                self.defer_checks(out, carried)
            return out
        self._label_call(method or func, method, args, kwargs, out, name)
        return out

    def _label_call(self, target, method, args, kwargs, out, name):
        labs = self.label_of(tuple(args))
        klabs = {k: self.label_of(v) for k, v in kwargs.items()}
        self.store(out, self.function(target, method, args, kwargs, labs, klabs, out, self.where(name)))

    # -- module hooks ---------------------------------------------------------------------------

    def pre_hook(self, module, args):
        if id(module) in self.leaves:
            if not self.depth:
                self._step_aside()
            self.depth += 1
        else:
            self.entered.add(id(module))
            self.stack.append(self.names.get(id(module), ""))

    def hook(self, module, args, kwargs, out):
        if id(module) not in self.leaves:
            name = self.stack.pop()
            if name in self.branching:
                self.busy = True
                try:
                    reason = self._branching_reason(module, name)
                    self.freeze_all(self.label_of(tuple(args)), reason)
                    self.freeze_all(self.label_of(kwargs), reason)
                    self.freeze_all(self.label_of(out), reason)
                finally:
                    self.busy = False
            return
        self.depth -= 1
        if self.depth:
            return
        self.ran.add(id(module))
        self.busy = True
        try:
            labs = [self.label_of(a) for a in args]
            values = args
            if kwargs:
                values, labs = rules.with_keywords(module, args, kwargs, labs, self.label_of(kwargs))
            self.store(out, rules.module_rule(self, self.names[id(module)], module, labs, list(values), out))
        finally:
            self.busy = False
            self.step_back()

    # While one of torch's layers runs (and its output is labelled), the mode is taken off torch's
    # stack: the layer's own calls would only pass through it, at a few µs each in Python.
    def _step_aside(self) -> None:
        stack = torch._C._len_torch_function_stack()
        if self.mode is not None and stack and torch._C._get_function_stack_at(stack - 1) is self.mode:
            torch._C._pop_torch_function_stack()
            self.aside = True

    def step_back(self) -> None:
        """Puts the mode back on torch's stack if a layer took it off (also after an error in it)."""
        if self.aside:
            torch._C._push_on_torch_function_stack(self.mode)
            self.aside = False

    @staticmethod
    def _branching_reason(module, name: str) -> str:
        return (f"{type(module).__name__} {name!r} turns a tensor value into a Python value (Python control flow, "
                "which torch.fx cannot trace either): the run saw one path, so its channels stay")

    def freeze_branching(self) -> None:
        """Freezes every member and parameter inside the submodules whose forward reads tensor values
        into Python (control flow): the run saw one of their paths. Their inputs and outputs were
        frozen when they returned. Reads in the model's own forward are the documented limit."""
        for name in self.branching:
            reason = self._branching_reason(self.modules[name], name)
            for (module, _, _), ids in self.members.items():
                if module == name or module.startswith(name + "."):
                    self.labels.freeze(ids, reason)
            for qualname, ids in self.positional.items():
                if qualname.startswith(name + "."):
                    self.labels.freeze(ids, reason)

    def unrun(self) -> List[str]:
        """Names of the modules that hold parameters or buffers the run never used. A buffer its
        module's forward did not read on this run is left out: it joins no group, so it is never sliced
        (a spare copy such as the ``original_inv_freq`` of LLaMA's rotary embedding, read only by
        dynamic RoPE); a parameter the forward skipped still counts."""
        used = set(self.seen)
        for module in self.modules.values():
            if id(module) in self.ran:
                if module._modules:  # a layer with sublayers (nn.MultiheadAttention's out_proj)
                    used.update(id(t) for t in [*module.parameters(), *module.buffers()])
                else:
                    used.update(id(t) for t in module._parameters.values() if t is not None)
                    used.update(id(t) for t in module._buffers.values() if t is not None)
        missing = [qualname for qualname_id, qualname in self.tensors.items() if qualname_id not in used
                   and not self._unread_buffer(qualname)]
        owners = [q.rpartition(".")[0] or "(the model itself)" for q in missing if self.named_tensors[q].dim() > 0]
        return list(dict.fromkeys(owners))

    def _unread_buffer(self, qualname: str) -> bool:
        owner, _, name = qualname.rpartition(".")
        module = self.modules.get(owner)
        return module is not None and id(module) in self.entered and name in module._buffers


def _named_tensors(modules: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """``dict([*model.named_parameters(), *model.named_buffers()])`` from the model's named modules
    (one walk of their dicts, several times cheaper than torch's generators): a tensor shared by
    several modules keeps its first name, as there."""
    tensors: Dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):  # every parameter first, then every buffer, as torch's order
        seen = set()
        for prefix, module in modules.items():
            dot = prefix + "." if prefix else ""
            for name, t in getattr(module, kind).items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    tensors.setdefault(dot + name, t)
    return tensors


@contextlib.contextmanager
def _observing(modules: Dict[str, nn.Module], handles: List):
    """`hooked_eval` for the recorded run, from the named modules it already has: eval mode under
    no_grad, then every train/eval flag restored and the hooks removed (no gradient can change:
    nothing runs backward)."""
    modes = [(module, module.training) for module in modules.values()]
    try:
        with torch.no_grad():
            if any(training for _, training in modes):  # (a model already in eval mode is left as it is)
                modules[""].eval()
            yield
    finally:
        for module, training in modes:
            if module.training != training:
                module.training = training
        for handle in handles:
            handle.remove()


def record(model: nn.Module, example_inputs: tuple, leaf) -> Recorder:
    """Runs ``model`` once on ``example_inputs`` and labels every call (see the module docstring);
    raises `Unrun` if a layer with parameters or buffers did not run."""
    recorder = Recorder(model, leaf)
    handles = []
    for module in recorder.modules.values():
        handles.append(module.register_forward_pre_hook(recorder.pre_hook, prepend=True))
        handles.append(module.register_forward_hook(recorder.hook, with_kwargs=True))
    with _observing(recorder.modules, handles):
        recorder.mode = _Mode(recorder)
        with recorder.mode:
            try:
                out = model(*example_inputs)
            finally:
                recorder.step_back()
        recorder.busy = True
        recorder.freeze_all(recorder.label_of(out), "reaches the model output")
    missing = recorder.unrun()
    if missing:
        raise Unrun(missing)
    recorder.freeze_branching()
    recorder.tie_shared(recorder.modules)
    recorder.labels.resolve()
    return recorder
