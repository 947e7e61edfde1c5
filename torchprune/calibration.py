"""Running calibration data through a model, without side effects, and THE parser of its inputs.

Data-driven criteria need forward (and, for gradient criteria, backward) passes; pruning must not
change anything else. The passes run in eval mode (no BatchNorm statistic updates, no dropout)
with gradients enabled even when the caller is under ``torch.no_grad()`` or
``torch.inference_mode()``, and afterwards every parameter's ``.grad`` and every submodule's own
train/eval flag are restored (see `state.py`).

Every entry point reads ``data`` through `batches` and ``example_inputs`` through `as_inputs`, and
calls the model with `call`, so that all of them accept the same forms with the same errors. A
batch's inputs are a tensor (``model(x)``), a tuple/list (``model(*inputs)``), a dict or other
Mapping (``model(**inputs)``, the Hugging Face convention) or an `Inputs` (``model(*args,
**kwargs)``). Backward passes read every batch as an ``(inputs, targets)`` pair; forward-only
passes also take bare inputs, and refuse a pair of two tensors that could be two inputs (`batches`).

* weight level: `observe` (`observe_gradients` / `observe_activations`) feeds a criterion's
  ``observe(layer)`` / ``observe_forward(layer, inputs, output)``;
* channel level: `observe_parameter_gradients` / `observe_outputs` return per-tensor sums of a
  criterion's ``gradient_term`` / ``output_statistics``, read by its ``channel_scores``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable, Dict, Hashable, Iterable, Iterator, List, Tuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .errors import describe
from .state import hooked_eval, preserved_state

__all__ = [
    "Inputs", "batches", "as_inputs", "call", "observe_gradients", "observe_activations", "observe",
    "observe_parameter_gradients", "observe_outputs",
]

INPUT_FORMS = "a tensor, a tuple/list of positional inputs, a dict of keyword inputs or a tp.Inputs"


class Inputs:
    """The positional and keyword arguments of one model call: one batch's inputs in ``data``, run
    as ``model(*args, **kwargs)``. It says "these are all inputs" where a bare 2-tuple would read
    as (inputs, targets); immutable (``.args`` a tuple, ``.kwargs`` a read-only mapping).

    >>> data = [tp.Inputs(input_ids, attention_mask=mask) for input_ids, mask in loader]  # forward only
    >>> data = [(tp.Inputs(image, text), labels) for image, text, labels in loader]        # with targets
    """

    __slots__ = ("args", "kwargs")

    def __init__(self, *args: Any, **kwargs: Any):
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", MappingProxyType(kwargs))

    def __setattr__(self, name, value=None):
        raise AttributeError("tp.Inputs is immutable: build a new one")

    __delattr__ = __setattr__

    def __reduce__(self):  # pickle and deepcopy (a mappingproxy does not pickle)
        return _rebuilt_inputs, (self.args, dict(self.kwargs))

    def __repr__(self) -> str:
        return f"Inputs({', '.join([repr(a) for a in self.args] + [f'{k}={v!r}' for k, v in self.kwargs.items()])})"


def _rebuilt_inputs(args: tuple, kwargs: dict) -> Inputs:
    return Inputs(*args, **kwargs)


def _positional_limit(model) -> float:
    """How many positional arguments ``model``'s forward takes: inf with ``*args`` or an unreadable
    signature, 1 without a model. DataParallel/DDP and torch.compile wrappers are looked through."""
    if model is None:
        return 1
    while isinstance(model, (nn.DataParallel, DistributedDataParallel)) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, (nn.DataParallel, DistributedDataParallel)) else model._orig_mod
    try:
        kinds = [p.kind for p in inspect.signature(getattr(model, "forward", model)).parameters.values()]
    except (TypeError, ValueError):
        return math.inf
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return math.inf
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)


def batches(data: Iterable, targets: bool = True, model=None) -> Iterator[Tuple[Any, Any]]:
    """The ``(inputs, targets)`` of each batch of ``data``; the inputs are a tensor, a tuple/list, a
    Mapping or an `Inputs` (see `call`). Raises TypeError on the first batch of another form.

    With ``targets=True`` (backward passes) every batch is an (inputs, targets) tuple/list. With
    ``targets=False`` (forward passes) a tensor, a Mapping or an `Inputs` is the bare inputs
    (targets None), and a 2-tuple/list is (inputs, targets) when that is the only reading: its
    first element is not a tensor, its second is not a tensor, or ``model``'s forward takes one
    positional argument (``model=None`` counts as one). Two tensors the forward could take both
    are ambiguous: TypeError, naming ``tp.Inputs(a, b)`` and ``(tp.Inputs(x), y)``.
    """
    limit = 1 if targets else _positional_limit(model)
    for batch in data:
        if not targets and isinstance(batch, (Tensor, Mapping, Inputs)):
            yield batch, None
            continue
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            pairs, several = ("", "(tp.Inputs(a, b), targets)") if targets else ("inputs or ", "tp.Inputs(a, b)")
            raise TypeError(f"`data` must yield {pairs}(inputs, targets) pairs, inputs being {INPUT_FORMS}; "
                            f"got {describe(batch)} (several inputs: {several})")
        inputs, target = batch
        if not isinstance(inputs, (Tensor, tuple, list, Mapping, Inputs)):
            raise TypeError(f"`data` must yield inputs that are {INPUT_FORMS}, got {describe(inputs)} "
                            "(any other object: tp.Inputs(obj))")
        if isinstance(inputs, Tensor) and isinstance(target, Tensor) and limit > 1:
            raise TypeError(
                f"`data` yielded a pair of tensors and {type(model).__name__}.forward may take both, so it is "
                "ambiguous: for two inputs write tp.Inputs(a, b) (or a dict of keyword inputs); for (inputs, "
                "targets) write ((x,), y) or (tp.Inputs(x), y)")
        yield inputs, target


def as_inputs(example_inputs, tensors_only: bool = False) -> tuple:
    """``example_inputs`` (a tensor, or a tuple/list of the model's inputs) as a tuple of positional
    arguments; with ``tensors_only`` every input must be a tensor. None is refused (ValueError)."""
    if example_inputs is None:
        raise ValueError(
            "`example_inputs` must be given for structural pruning: a tensor or a tuple of the model's inputs"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if tensors_only:
        if not isinstance(example_inputs, (tuple, list)) or not all(isinstance(x, Tensor) for x in example_inputs):
            raise TypeError("`example_inputs` must be a Tensor or a tuple/list of Tensors, "
                            f"got {describe(example_inputs)}")
        return tuple(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"`example_inputs` must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}")


def call(model: nn.Module, inputs) -> Any:
    """``model`` on one batch's inputs: an `Inputs` is ``model(*args, **kwargs)``, a Mapping (a dict,
    a Hugging Face BatchEncoding) ``model(**inputs)``, a tuple/list ``model(*inputs)``, else ``model(inputs)``."""
    if isinstance(inputs, Inputs):
        return model(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _autograd_ready(value):
    """Inference-mode tensors cannot enter autograd: a normal clone of them (nested in tuples, lists,
    `Inputs` and Mappings; a Mapping comes back as a dict)."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        return value.clone()
    if isinstance(value, Inputs):
        return Inputs(*_autograd_ready(value.args), **_autograd_ready(value.kwargs))
    if isinstance(value, Mapping):
        return {key: _autograd_ready(v) for key, v in value.items()}
    if type(value) in (tuple, list):
        return type(value)(_autograd_ready(v) for v in value)
    return value


def backward_passes(model: nn.Module, data: Iterable, loss_fn: Callable, after_backward: Callable[[], None]) -> None:
    """One backward pass of ``loss_fn(model(inputs), targets)`` per batch of ``data``, each from
    cleared gradients, calling ``after_backward()`` after each. Raises ValueError if ``data`` is empty."""
    count = 0
    with preserved_state(model) as params, torch.inference_mode(False), torch.enable_grad():
        model.eval()
        for inputs, targets in batches(data, model=model):
            for p in params:
                p.grad = None
            loss_fn(call(model, _autograd_ready(inputs)), _autograd_ready(targets)).backward()
            after_backward()
            count += 1
    if count == 0:
        raise ValueError("`data` yielded no batches")


def forward_passes(model: nn.Module, data: Iterable, hooks: List[Tuple[nn.Module, Callable]]) -> None:
    """One observation-only forward pass per batch of ``data`` (pairs or bare inputs) with each
    ``(module, hook)`` of ``hooks`` registered as a forward hook. Raises ValueError if ``data`` is empty."""
    count = 0
    with hooked_eval(model, [module.register_forward_hook(hook) for module, hook in hooks]):
        for inputs, _ in batches(data, targets=False, model=model):
            call(model, inputs)
            count += 1
    if count == 0:
        raise ValueError("`data` yielded no batches")


def observe_gradients(
    model: nn.Module, layers: Dict[str, nn.Module], criterion, data: Iterable, loss_fn: Callable
) -> None:
    """One backward pass per ``(inputs, targets)`` batch of ``data``; after each, the criterion
    observes every layer of ``layers``. Raises ValueError if a layer got no gradient at all."""

    def observe_all():
        for layer in layers.values():
            criterion.observe(layer)

    backward_passes(model, data, loss_fn, observe_all)
    silent = [name for name, layer in layers.items() if not criterion.observed(layer)]
    if silent:
        raise ValueError(
            f"layers {silent} received no gradient from `data` and `loss_fn` (frozen with "
            "requires_grad=False, or not used by the forward): exclude them with `exclude`"
        )


def observe_activations(model: nn.Module, layers: Dict[str, nn.Module], criterion, data: Iterable) -> None:
    """One forward pass per batch of ``data`` (``(inputs, targets)`` pairs or bare inputs) in eval mode
    under ``no_grad``; forward hooks hand each layer's inputs and output to
    ``criterion.observe_forward(layer, inputs, output)``. Raises ValueError if a layer never ran."""

    forward_passes(model, data, [(layer, criterion.observe_forward) for layer in layers.values()])
    silent = [name for name, layer in layers.items() if not criterion.observed(layer)]
    if silent:
        raise ValueError(f"layers {silent} were not called by the forward on `data`: exclude them with `exclude`")


def observe(model: nn.Module, layers: Dict[str, nn.Module], criterion, data: Iterable, loss_fn=None) -> None:
    """Feeds ``data`` to a data-driven criterion: backward passes when it needs a loss
    (``criterion.requires_loss``), forward passes otherwise."""
    if getattr(criterion, "requires_loss", False):
        observe_gradients(model, layers, criterion, data, loss_fn)
    else:
        observe_activations(model, layers, criterion, data)


def observe_parameter_gradients(
    model: nn.Module, tensors: Dict[Hashable, nn.Parameter], term: Callable, data: Iterable, loss_fn: Callable
) -> Dict[Hashable, torch.Tensor]:
    """Sum over the backward passes on ``data`` of ``term(tensor, tensor.grad)`` in float64, for
    each parameter of ``tensors`` (zeros for one that never gets a gradient)."""
    sums = {key: torch.zeros_like(t, dtype=torch.float64) for key, t in tensors.items()}

    def add_terms():
        for key, t in tensors.items():
            if t.grad is not None:
                sums[key] += term(t.detach(), t.grad).double()

    backward_passes(model, data, loss_fn, add_terms)
    return sums


def observe_outputs(
    model: nn.Module, producers: Dict[Hashable, Tuple[nn.Module, int]], statistic: Callable, data: Iterable
) -> Dict[Hashable, Dict[str, torch.Tensor]]:
    """Sums over the forward passes on ``data`` of ``statistic(output, dim)`` (a dict of tensors) for
    the output of each ``(module, dim)`` of ``producers``; a module that never runs is left out."""
    sums: Dict[Hashable, Dict[str, torch.Tensor]] = {}

    def hook_for(key, dim):
        def hook(module, inputs, output):
            stats = sums.setdefault(key, {})
            for name, value in statistic(output.detach(), dim).items():
                stats[name] = value if name not in stats else stats[name] + value
        return hook

    forward_passes(model, data, [(module, hook_for(key, dim)) for key, (module, dim) in producers.items()])
    return sums
