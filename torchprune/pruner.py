"""Pruner: pruning while training, gradually, by a sparsity schedule (Zhu & Gupta 2017).

The model keeps learning while weights are removed, so it recovers from each small cut instead of
one large one. `step()` goes right after ``optimizer.step()``; it counts training steps, lets
data-driven criteria accumulate what the training step saw, and at the schedule's update steps
ranks the surviving weights and masks more of them. Masks only grow: a pruned weight never comes
back (there is no regrowth option in this version).

Where scores come from, per criterion:

* weight criteria (magnitude, filter norm, random): the weights at the update step;
* ``Gradient`` / ``Taylor``: the ``.grad`` of each layer's weight at every `step()` call, summed
  since the previous update (Taylor uses the weight after the optimizer step);
* ``Activation`` / ``Wanda``: forward hooks on the layers observe every forward pass made in train
  mode since the previous update (eval-mode passes, e.g. validation, are not counted);
* with ``data`` (and ``loss_fn`` for gradient criteria) every update scores on those batches
  instead, as `prune()` does.

With ``granularity="channel"`` the Pruner prunes whole coupled channels instead (zeroed while
training, removed at `finalize()`): see progressive_channels.py.

Under DistributedDataParallel (pass the wrapper or its ``.module``, the same call on every rank)
the data-driven statistics are averaged across ranks before each ranking and the new masks are
compared across ranks after it (distributed.py), so every rank's copy stays the same.

A copy of the model (``copy.deepcopy``, pickle) keeps its masks but not the Pruner's observation
hooks; a copy of the Pruner copies its model and carries on with its own statistics.

>>> pruner = tp.Pruner(model, 0.9, tp.schedules.Cubic(begin=0, end=1000, every=100))
>>> for inputs, targets in loader:
...     loss_fn(model(inputs), targets).backward(); optimizer.step(); optimizer.zero_grad()
...     pruner.step()
"""

from __future__ import annotations

import numbers
import weakref
from typing import Callable, Dict, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from . import selection
from .calibration import observe
from .distributed import average_importance_state, check_equal_across_ranks, fail_together, unwrap
from .importance import Importance, resolve
from .masking import attach_mask, check_supported, get_mask, remove_mask
from .pruner import (_GRANULARITY_HELP, _check_data_args, _check_finite_weights, _check_n_m_divides, _check_sparsity_value, _checked_score,
                     _current_mask, _parse_granularity, _target_layers, _weight_owners)
from .schedules import Schedule

__all__ = ["Pruner"]

_STATE_VERSION = 2  # 2 added "shapes"; version 1 states still load
_STRUCTURAL = ("channel", "head", "layer")


class Pruner:
    """Prunes ``model`` to ``target_sparsity`` along ``schedule`` while it trains.

    ``granularity="channel"`` (with ``example_inputs``) returns a `ChannelPruner`
    (progressive_channels.py): whole coupled channels zeroed while training and removed
    physically at `finalize()`. Otherwise:

    ``importance``, ``granularity`` ("weight" or "N:M"), ``scope`` ("layer", "global" or a dict
    {layer_name: final sparsity}, e.g. from `tp.allocate`) and ``exclude`` mean what they mean in
    `prune()`. With a dict scope pass ``target_sparsity=None``: each layer follows the schedule
    towards its own final sparsity. With N:M the schedule's sparsity s prunes round(s * M) weights
    of every group of M (never more than M - N), so 2:4 goes 0 -> 1:4 pruned -> 2:4.

    All layers get a mask (all true) at construction, so the model's state_dict has the same keys
    from the first step on and a checkpoint loads into a fresh model wrapped by a fresh Pruner.
    ``example_inputs`` is only used with ``granularity="channel"``. ``model`` may be a
    DistributedDataParallel wrapper: layer names are those of its ``.module``.
    """

    def __new__(cls, *args, **kwargs):
        granularity = kwargs.get("granularity", args[4] if len(args) > 4 else "weight")
        if cls is Pruner and granularity == "channel":
            from .progressive_channels import ChannelPruner

            return super().__new__(ChannelPruner)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        target_sparsity: Optional[float] = None,
        schedule: Optional[Schedule] = None,
        importance: Union[str, Importance] = "magnitude",
        granularity: str = "weight",
        scope: Union[str, Mapping[str, float]] = "layer",
        exclude: Iterable = (),
        data: Optional[Iterable] = None,
        loss_fn: Optional[Callable] = None,
        example_inputs=None,
    ):
        model = self._checked_model(model, schedule)
        criterion = resolve(importance)
        if isinstance(granularity, str) and granularity.strip() in _STRUCTURAL:
            raise ValueError(
                f"`granularity` must be {_GRANULARITY_HELP} or 'channel', got {granularity!r}: the Pruner does "
                "not prune attention heads or layers progressively (use tp.prune for those)"
            )
        n_m = _parse_granularity(granularity)
        dict_scope = isinstance(scope, Mapping)
        if not dict_scope and scope not in ("layer", "global"):
            raise ValueError(f"`scope` must be one of ['layer', 'global'] or a dict {{module_name: sparsity}}, got {scope!r}")
        if dict_scope and (target_sparsity is not None or schedule.final is not None):
            raise ValueError("with a dict `scope` the final sparsities come from it: pass target_sparsity=None "
                             "and a schedule without `final`")
        if dict_scope:
            for key, value in scope.items():
                _check_sparsity_value(value, f"`scope[{key!r}]`")
        if n_m is not None and (dict_scope or scope != "layer"):
            raise ValueError(f"`scope` must be 'layer' for N:M granularity, got {scope!r}")
        if not dict_scope:
            target_sparsity = self._check_target(target_sparsity, schedule, n_m)
        layers, scope = _target_layers(model, exclude, scope)
        owners = _weight_owners(model, layers, scope)
        check_supported(layers)
        if n_m is not None:
            _check_n_m_divides(layers, n_m)
        if data is not None and criterion.requires_data:
            _check_data_args(data, loss_fn, importance, criterion.requires_loss)
        elif data is not None or loss_fn is not None:
            raise ValueError(f"`data`/`loss_fn` are for data-driven criteria; importance {importance!r} does not use them")
        unique = {name: layer for name, layer in layers.items() if owners[name] == name}
        if dict_scope:
            schedules = {name: schedule.resolved(float(scope[name])) for name in unique}
        else:
            schedules = {name: schedule.resolved(target_sparsity) for name in unique}
        criterion.prepare(model, unique)  # e.g. BNScale finds its BatchNorms now, not mid-training

        self.model = model
        self.target_sparsity = target_sparsity
        self.schedule = schedule.resolved(target_sparsity) if not dict_scope else schedule
        self.importance = criterion
        self.granularity = granularity
        self.scope = scope
        self._n_m = n_m
        self._layers = layers
        self._owners = owners
        self._unique = unique
        self._schedules = schedules
        self._data = data
        self._loss_fn = loss_fn
        self._step = 0
        self._updates = 0
        self._finalized = False
        self._hooks = []
        for name, layer in layers.items():
            attach_mask(layer, _current_mask(layer))
        criterion.reset()
        if criterion.requires_data and not criterion.requires_loss and data is None:
            self._observe_training_forwards()

    def _observe_training_forwards(self) -> None:
        self._hooks = [layer.register_forward_hook(_ObservationHook(self)) for layer in self._unique.values()]

    @staticmethod
    def _checked_model(model, schedule) -> nn.Module:
        """The module to prune (a DistributedDataParallel wrapper's ``.module``), after checking the
        two arguments every Pruner takes first."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"`schedule` must be a tp.schedules.Schedule, got {type(schedule).__name__}")
        return unwrap(model)

    @staticmethod
    def _check_target(target, schedule: Schedule, n_m) -> float:
        if target is None and schedule.final is None and n_m is not None:
            target = 1 - n_m[0] / n_m[1]  # N:M fixes the final sparsity
        if target is None:
            if schedule.final is None:
                raise ValueError("pass `target_sparsity`, or a schedule with `final` set")
            target = schedule.final
        _check_sparsity_value(target, "`target_sparsity`")
        if schedule.final is not None and abs(schedule.final - float(target)) > 1e-12:
            raise ValueError(f"`schedule` ends at final={schedule.final} but `target_sparsity` is {target}: make them agree")
        if n_m is not None and abs(float(target) - (1 - n_m[0] / n_m[1])) > 1e-9:
            raise ValueError(f"`target_sparsity` must be {1 - n_m[0] / n_m[1]} for {n_m[0]}:{n_m[1]} granularity, got {target}")
        return float(target)

    def _forward_hook(self, module, inputs, output) -> None:
        if module.training and not self._finalized:
            self.importance.observe_forward(module, inputs, output)

    @property
    def sparsity(self) -> float:
        """The sparsity the pruned layers have now (fraction of zero effective weights among them)."""
        zeros = total = 0
        for layer in self._unique.values():
            mask = _current_mask(layer)
            zeros += int((~mask).sum()) if not self._finalized else int((layer.weight == 0).sum())
            total += mask.numel()
        return zeros / total if total else 0.0

    @property
    def steps(self) -> int:
        """How many times `step()` has been called."""
        return self._step

    def target_at(self, step: Optional[int] = None) -> Dict[str, float]:
        """The scheduled sparsity of each pruned layer at ``step`` (default: the last step taken)."""
        step = max(self._step - 1, 0) if step is None else step
        return {name: s.sparsity_at(step) for name, s in self._schedules.items()}

    def step(self) -> bool:
        """Call once per training step, after ``optimizer.step()``; returns True when the masks were
        updated (at the schedule's update steps with a target above 0)."""
        if self._finalized:
            raise RuntimeError("the Pruner was finalized: its masks are permanent and it cannot step any more")
        criterion = self.importance
        if criterion.requires_loss and self._data is None:
            for layer in self._unique.values():
                criterion.observe(layer)
        step = self._step
        self._step += 1
        if not any(s.is_update(step) for s in self._schedules.values()):
            return False
        return self._update(step)

    def _update(self, step: int) -> bool:
        _check_finite_weights(self._unique)  # a diverged run: say which layer, before ranking noise
        criterion = self.importance
        criterion.prepare(self.model, self._unique)
        if self._data is not None:
            criterion.reset()
            with fail_together("scoring on the Pruner's `data`"):  # a rank's own data may fail alone
                observe(self.model, self._unique, criterion, self._data, self._loss_fn)
        current = {name: _current_mask(layer) for name, layer in self._unique.items()}
        targets = {name: s.sparsity_at(step) for name, s in self._schedules.items()}
        if all(t == 0 for t in targets.values()):
            criterion.reset()
            return False
        if criterion.requires_data:  # each rank observed its own batches: rank on their average
            average_importance_state(criterion, self._unique)
        scores = {name: _checked_score(criterion, name, layer, current[name]) for name, layer in self._unique.items()}
        new = self._select(scores, current, targets)
        for name, layer in self._layers.items():
            attach_mask(layer, new[self._owners[name]])
        self._updates += 1
        criterion.reset()  # scores accumulate between updates
        check_equal_across_ranks(new, step)
        return True

    def _select(self, scores, current, targets) -> Dict[str, torch.Tensor]:
        names = list(scores)
        if self._n_m is not None:
            m = self._n_m[1]
            out = {}
            for name in names:
                pruned = min(int(round(targets[name] * m)), m - self._n_m[0])
                out[name] = current[name] if pruned == 0 else selection.n_of_m(scores[name], current[name], m - pruned, m)
            return out
        if self.scope == "global":
            masks = selection.by_global_ratio([scores[k] for k in names], [current[k] for k in names],
                                              targets[names[0]])
            return dict(zip(names, masks))
        by_ratio = selection.by_row_ratio if getattr(self.importance, "compare_within_rows", False) else selection.by_ratio
        return {k: by_ratio(scores[k], current[k], targets[k]) for k in names}

    def state_dict(self) -> dict:
        """The step count and the criterion's accumulated state (the masks live in the model's
        state_dict). Together with the model's and optimizer's state it resumes a run exactly."""
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "updates": self._updates,
            "layers": list(self._unique),
            "shapes": {name: list(layer.weight.shape) for name, layer in self._unique.items()},
            "importance": self.importance.state_dict(self._unique),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()` output into a Pruner built with the same arguments; a layer whose
        weight has another shape than when saved is named in a ValueError (nothing is changed).

        Under DDP the statistics gathered since the last update are each rank's own: load every
        rank's own state, or checkpoint right after an update (when there are none) if only rank 0
        saves."""
        if not isinstance(state, dict) or state.get("version") not in (1, _STATE_VERSION):
            raise ValueError("`state` must be a dict returned by Pruner.state_dict()")
        if state.get("layers") != list(self._unique):
            raise ValueError(f"`state` was saved for layers {state.get('layers')}, this Pruner prunes {list(self._unique)}")
        shapes = state.get("shapes")  # version 1 states have none
        for name, layer in self._unique.items() if shapes is not None else ():
            if list(shapes.get(name, ())) != list(layer.weight.shape):
                raise ValueError(f"`state` was saved for layer {name!r} with weight shape {shapes.get(name)}, but this "
                                 f"model's {name!r} has shape {list(layer.weight.shape)}")
        if self._finalized:
            raise RuntimeError("the Pruner was finalized; build a new one to resume")
        step, updates = state.get("step"), state.get("updates")
        for value, what in ((step, "step"), (updates, "updates")):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"`state[{what!r}]` must be a non-negative int, got {value!r}")
        before = self.importance.state_dict(self._unique)
        try:
            self.importance.reset()
            self.importance.load_state_dict(state["importance"], self._unique)
        except Exception:  # leave the criterion as it was
            self.importance.reset()
            self.importance.load_state_dict(before, self._unique)
            raise
        self._step = int(step)
        self._updates = int(updates)

    def __getstate__(self) -> dict:
        """For pickle and deepcopy: the criterion's statistics are keyed by module identity, so they
        travel by layer name and are re-keyed to the copied layers in `__setstate__`."""
        state = self.__dict__.copy()
        state["_importance_by_name"] = self.importance.state_dict(self._unique)
        return state

    def __setstate__(self, state: dict) -> None:
        by_name = state.pop("_importance_by_name")
        self.__dict__.update(state)
        self.importance.reset()
        self.importance.load_state_dict(by_name, self._unique)
        if self._hooks:  # the copied layers hold inert copies of the hooks: observe through this copy
            for handle in self._hooks:
                handle.remove()
            self._observe_training_forwards()

    def finalize(self) -> nn.Module:
        """Makes the masks permanent (pruned weights zero, plain layers back), removes the hooks
        and returns the model. Call it when training is over."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for layer in self._layers.values():
            mask = get_mask(layer)
            if mask is not None:
                with torch.no_grad():
                    layer.weight.masked_fill_(~mask, 0)
                remove_mask(layer)
        self._finalized = True
        self.importance.reset()
        return self.model

    def __repr__(self) -> str:
        return (f"Pruner(target_sparsity={self.target_sparsity}, schedule={self.schedule!r}, importance={self.importance!r}, "
                f"granularity={self.granularity!r}, scope={self.scope!r}, layers={len(self._unique)}, step={self._step}, "
                f"sparsity={self.sparsity:.4f})")


class _ObservationHook:
    """The forward hook through which a Pruner observes training forward passes.

    It holds the Pruner weakly (a Pruner dropped without `finalize()` stops observing instead of
    accumulating forever), and a copy of it, made when the model is deep-copied or pickled, observes
    nothing: a copied model must not feed the original Pruner's statistics, and a copied Pruner
    registers hooks of its own on its copied layers.
    """

    def __init__(self, pruner: Optional[Pruner]):
        self._pruner = weakref.ref(pruner) if pruner is not None else None

    def __call__(self, module, inputs, output) -> None:
        pruner = self._pruner() if self._pruner is not None else None
        if pruner is not None:
            pruner._forward_hook(module, inputs, output)

    def __reduce__(self):
        return _ObservationHook, (None,)
