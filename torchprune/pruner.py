"""Pruner: pruning while training, gradually, by a sparsity schedule (Zhu & Gupta 2017).

The model keeps learning while weights are removed, so it recovers from each small cut instead of
one large one. `step()` goes right after ``optimizer.step()``; it counts training steps, lets
data-driven criteria accumulate what the training step saw, and at the schedule's update steps
ranks the surviving weights and masks more of them. Masks only grow by default: a pruned weight
never comes back. With ``regrow=`` (weights only) the Pruner also swaps weights at its regrowth
steps, RigL's way: the weakest kept weights go and as many pruned weights with the largest dense
gradient come back, at zero, so the sparsity stays exactly the schedule's (regrowth.py).

Where scores come from, per criterion:

* weight criteria (magnitude, filter norm, random): the weights at the update step;
* ``Gradient`` / ``Taylor``: the ``.grad`` of each layer's weight at every `step()` call, summed
  since the previous update (Taylor uses the weight after the optimizer step);
* ``Activation`` / ``Wanda`` / ``SparseGPT``: forward hooks on the layers observe every forward
  pass made in train mode since the previous update (eval-mode passes, e.g. validation, are not
  counted); SparseGPT then also reconstructs the weights it keeps at each update;
* with ``data`` (and ``loss_fn`` for gradient criteria) every update scores on those batches
  instead, as `prune()` does.

With ``granularity="channel"`` the Pruner prunes whole coupled channels instead (zeroed while
training, removed at `finalize()`): see channel_pruner.py.

One lifecycle, two strategies: `Pruner` owns what every granularity shares (the step count, the
schedule's update steps, the finalize guard, the state_dict header, the DDP unwrap, copy and
pickle) and holds a strategy that decides what one update prunes and how: `WeightStrategy` (here)
masks weights ("weight", "N:M"); `ChannelStrategy` (channel_pruner.py) zeroes coupled channels.

Under DistributedDataParallel (pass the wrapper or its ``.module``, the same call on every rank)
the data-driven statistics are averaged across ranks before each ranking and the new masks are
compared across ranks after it (distributed.py), so every rank's copy stays the same.

A copy of the model (``copy.deepcopy``, pickle) keeps its masks but not the Pruner's observation
hooks; a copy of the Pruner copies its model and carries on with its own statistics.

>>> pruner = tp.Pruner(model, 0.9, tp.schedules.Cubic(begin=0, end=1000, every=100))
>>> for inputs, targets in loader:
...     optimizer.zero_grad(); loss_fn(model(inputs), targets).backward(); optimizer.step()
...     pruner.step()          # before the next zero_grad: gradient criteria read .grad
"""

from __future__ import annotations

import numbers
import weakref
from typing import Callable, Dict, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from . import selection
from .calibration import observe
from .channel_pruner import ChannelStrategy
from .distributed import average_, average_importance_state, check_equal_across_ranks, fail_together, unwrap
from .importance import Importance, resolve
from .masking import attach_mask, check_supported, get_mask, remove_mask
from .regrowth import DenseGradients, Regrow, checked_regrow
from .schedules import Adaptive, Schedule
from .targets import (
    GRANULARITY_HELP,
    STRUCTURAL,
    check_blocks_divide,
    check_data_args,
    check_dict_scope,
    check_finite_weights,
    check_n_m_divides,
    check_scope,
    check_target,
    checked_score,
    current_mask,
    leave_out_tied,
    nonfinite,
    parse_block,
    parse_granularity,
    refuse_freeze,
    refuse_unused_data,
    target_layers,
    weight_owners,
)

__all__ = ["Pruner", "ChannelPruner", "WeightStrategy"]


class Pruner:
    """Prunes ``model`` to ``target_sparsity`` along ``schedule`` while it trains.

    ``granularity="channel"`` (with ``example_inputs``) returns a `ChannelPruner`: whole coupled
    channels zeroed while training and removed physically at `finalize()` (channel_pruner.py).
    Otherwise:

    ``importance``, ``granularity`` ("weight" or "N:M"), ``scope`` ("layer", "global" or a dict
    {layer_name: final sparsity}, e.g. from `tp.allocate`), ``exclude``, ``data`` and ``loss_fn``
    mean what they mean in `prune()` (``data``'s batches: tensors, tuples, dicts for
    ``model(**batch)`` or `tp.Inputs`, as pairs with targets for gradient criteria). With a dict
    scope pass ``target_sparsity=None``: each layer follows the schedule towards its own final
    sparsity. With N:M the schedule's sparsity s prunes round(s * M) weights
    of every group of M (never more than M - N), so 2:4 goes 0 -> 1:4 pruned -> 2:4. As in
    `prune()`, a layer tied to a module that is never pruned (GPT-2's ``lm_head``, which holds the
    token embedding's weight) is left unpruned with a warning, unless a dict scope names it (then
    it raises).

    ``regrow`` (None, a fraction, or a `tp.Regrow`; weight granularity, criteria that do not
    reconstruct): dynamic sparsity, RigL. At each regrowth step (by default the schedule's updates)
    each layer swaps ``fraction`` (cosine-decayed) of its kept weights: those the criterion scores
    lowest are pruned, and as many weights pruned before the step, those with the largest gradient
    of the training step just taken, come back at zero with zero optimizer moments. Call `step()`
    after a training step's backward (it is, after ``optimizer.step()``): the dense gradients are
    recorded during the forward and backward of the step before each regrowth step.

    All layers get a mask (all true) at construction, so the model's state_dict has the same keys
    from the first step on and a checkpoint loads into a fresh model wrapped by a fresh Pruner.
    ``example_inputs`` and ``freeze`` are only used with ``granularity="channel"``. ``model`` may be a
    DistributedDataParallel wrapper: layer names are those of its ``.module``.
    """

    def __new__(cls, model=None, target_sparsity=None, schedule=None, importance="magnitude", granularity="weight",
                *args, **kwargs):
        # tp.Pruner(..., granularity="channel") is a ChannelPruner: this lifecycle, plus the channel accessors.
        # (copy and pickle call __new__ with no arguments: the class is already the right one then)
        return super().__new__(ChannelPruner if cls is Pruner and granularity == "channel" else cls)

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
        freeze: Iterable = (),
        regrow: Union[None, float, Regrow] = None,
    ):
        model = _checked_model(model, schedule)
        schedule = schedule.fresh()  # tp.schedules.Adaptive: this Pruner's own run
        criterion = resolve(importance)
        regrow = checked_regrow(regrow)
        if isinstance(self, ChannelPruner):
            if regrow is not None:
                raise ValueError("`regrow` must be None with granularity='channel': regrowth swaps single weights")
            if isinstance(schedule, Adaptive):
                raise ValueError("`schedule` must not be tp.schedules.Adaptive with granularity='channel': "
                                 "going back to the sparsity that held is built for weight masks")
            strategy = ChannelStrategy(model, criterion, target_sparsity, schedule, importance, granularity, scope,
                                       exclude, data, loss_fn, example_inputs, freeze)
        else:
            refuse_freeze(freeze, granularity)
            strategy = WeightStrategy(model, criterion, target_sparsity, schedule, importance, granularity, scope,
                                      exclude, data, loss_fn, regrow)
        self.model = model
        self.target_sparsity = strategy.target_sparsity
        self.schedule = strategy.schedule
        self.importance = criterion
        self.granularity = granularity
        self.scope = strategy.scope
        self._strategy = strategy
        self._step = 0
        self._updates = 0
        self._finalized = False
        strategy.prepare(0)

    @property
    def sparsity(self) -> float:
        """The sparsity the pruned layers have now: the fraction of zero effective weights among them
        (with ``granularity="channel"``: of the groups' channels zeroed, or removed after `finalize()`)."""
        return self._strategy.sparsity(self._finalized)

    @property
    def steps(self) -> int:
        """How many times `step()` has been called."""
        return self._step

    def target_at(self, step: Optional[int] = None) -> Dict[str, float]:
        """The scheduled sparsity of each pruned layer at ``step`` (default: the last step taken)."""
        step = max(self._step - 1, 0) if step is None else step
        return {name: s.sparsity_at(step) for name, s in self._strategy.schedules.items()}

    def step(self) -> bool:
        """Call once per training step, after ``optimizer.step()``; returns True when the masks were
        updated (at the schedule's update steps with a target above 0)."""
        strategy = self._strategy
        if self._finalized:
            raise RuntimeError(f"the Pruner was finalized: {strategy.finalized_note} and it cannot step any more")
        strategy.observe_step()
        step = self._step
        action = self.schedule.advance(step)  # Adaptive: the metric decides this step's sparsity
        if action == "raise":
            strategy.remember()  # the sparsity now held: where a later "revert" comes back to
        elif action in ("revert", "stop"):
            strategy.revert()
        self._step += 1
        try:
            updated = strategy.is_update(step) and strategy.update(step)
            if updated:
                self._updates += 1  # counted before the check: the update is applied even when ranks differ
                strategy.check_across_ranks(step)
            strategy.after_step()
        finally:  # also after a failed update: the next step records (or not) as it should
            strategy.prepare(self._step)
        return updated

    def state_dict(self) -> dict:
        """The step count and the strategy's state: the criterion's accumulated statistics (the masks
        live in the model's state_dict), or the zeroed channels. Together with the model's and
        optimizer's state it resumes a run exactly."""
        strategy = self._strategy
        header = {"version": strategy.state_version, "step": self._step, "updates": self._updates}
        schedule = self.schedule.state_dict()  # an Adaptive schedule's decisions (fixed curves: none)
        return {**header, **strategy.state_dict(), **({"schedule": schedule} if schedule else {})}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()` output into a Pruner built with the same arguments; a layer whose
        weight has another shape than when saved (a channel group of another size) is named in a
        ValueError, and nothing is changed.

        Under DDP the statistics gathered since the last update are each rank's own: load every
        rank's own state, or checkpoint right after an update (when there are none) if only rank 0
        saves."""
        strategy = self._strategy
        if (not isinstance(state, dict) or state.get("version") not in strategy.state_versions
                or state.get("granularity") != strategy.state_granularity):
            raise ValueError(f"`state` must be a dict returned by Pruner.state_dict(){strategy.state_note}")
        strategy.check_state(state)
        if isinstance(self.schedule, Adaptive) != ("schedule" in state):
            raise ValueError("`state` was saved by a Pruner with " + ("an" if "schedule" in state else "no")
                             + " Adaptive schedule, unlike this one")
        decisions = state.get("schedule")
        history = decisions.get("history") if isinstance(decisions, dict) else None  # checked by the schedule
        raised = isinstance(history, list) and any(isinstance(r, dict) and r.get("action") == "raise" for r in history)
        held = state.get("held")
        if raised and (not isinstance(held, dict) or set(held) != set(state.get("layers") or ())):
            raise ValueError("`state` has Adaptive raises but no 'held' entry for every layer (the masks a revert "
                             "goes back to)")
        if self._finalized:
            raise RuntimeError("the Pruner was finalized; build a new one to resume")
        step, updates = state.get("step"), state.get("updates")
        for value, what in ((step, "step"), (updates, "updates")):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"`state[{what!r}]` must be a non-negative int, got {value!r}")
        schedule_before = self.schedule.state_dict()
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        try:
            strategy.load_state(state)
        except Exception:  # nothing changed: the schedule's decisions go back too
            self.schedule.load_state_dict(schedule_before)
            raise
        self._step = int(step)
        self._updates = int(updates)
        strategy.prepare(self._step)

    def __getstate__(self) -> dict:
        """For pickle and deepcopy: what the strategy keys by module identity (the criterion's
        statistics) travels by layer name and is re-keyed to the copied layers in `__setstate__`."""
        state = self.__dict__.copy()
        state["_strategy_by_name"] = self._strategy.portable_state()
        return state

    def __setstate__(self, state: dict) -> None:
        by_name = state.pop("_strategy_by_name")
        self.__dict__.update(state)
        self._strategy.restore(by_name)

    def finalize(self) -> nn.Module:
        """Makes the pruning permanent and returns the model; call it when training is over. Masks:
        pruned weights zero, plain layers back, hooks removed. Channels: removed physically (the
        layers get new parameters: build the optimizer anew to fine-tune)."""
        if not self._finalized:
            self._strategy.finalize()
            self._finalized = True
        return self.model

    def __repr__(self) -> str:
        return (f"Pruner(target_sparsity={self.target_sparsity}, schedule={self.schedule!r}, "
                f"importance={self.importance!r}, granularity={self.granularity!r}, scope={self.scope!r}, "
                f"layers={len(self._strategy.schedules)}, step={self._step}, sparsity={self.sparsity:.4f})")


class ChannelPruner(Pruner):
    """What ``tp.Pruner(..., granularity="channel", example_inputs=...)`` returns: the Pruner's
    lifecycle with a `ChannelStrategy` (channel_pruner.py), plus the channel groups' accessors.

    ``scope="layer"`` prunes ``target_sparsity`` of each group (it keeps floor((1 - s) * channels),
    at least one), ``scope="global"`` of all groups' channels together, as ``tp.prune(...,
    granularity="channel")`` does. ``exclude`` keeps an excluded layer's own output channels, while the
    channels it reads may still be pruned with their producer (its weight's input slices with them):
    ``exclude=["fc"]`` keeps the class count and still prunes the penultimate layer. ``freeze``
    leaves a module completely unchanged: every group it is in, in any role, stays whole.
    ``sparsity`` is the fraction of the groups' channels zeroed so far.
    """

    @property
    def graph(self):
        """The `tp.DependencyGraph` traced at construction."""
        return self._strategy.graph

    @property
    def groups(self):
        """The channel groups this Pruner prunes, by name (the group's first member)."""
        return self._strategy.groups

    def removed_channels(self) -> Dict[str, list]:
        """The zeroed (after `finalize()`: removed) channel indices of each group, by group name."""
        return self._strategy.removed_channels()

    def __repr__(self) -> str:
        return (f"Pruner(granularity='channel', target_sparsity={self.target_sparsity}, schedule={self.schedule!r}, "
                f"importance={self.importance!r}, scope={self.scope!r}, groups={len(self._strategy.groups)}, "
                f"step={self._step}, sparsity={self.sparsity:.4f})")


def _checked_model(model, schedule) -> nn.Module:
    """The module to prune (a DistributedDataParallel wrapper's ``.module``), after checking the
    two arguments every Pruner takes first."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"`schedule` must be a tp.schedules.Schedule, got {type(schedule).__name__}")
    return unwrap(model)


class WeightStrategy:
    """What a Pruner's update does with ``granularity="weight"`` or ``"N:M"``: ranks the surviving
    weights of every target layer and masks more of them (masks only grow).

    The strategy's contract with `Pruner` (`ChannelStrategy` keeps the same one): ``target_sparsity``,
    ``schedule``, ``scope`` and ``schedules`` ({name: schedule}) as resolved at construction;
    ``observe_step()`` / ``is_update(step)`` / ``update(step) -> bool`` / ``check_across_ranks(step)``
    (after an update) / ``after_step()`` around each step, then ``prepare(next_step)`` (also at
    construction and after a resume); ``sparsity(finalized)``;
    ``state_dict()`` / ``check_state()`` / ``load_state()`` below the header the Pruner writes;
    ``portable_state()`` / ``restore()`` for copies; ``finalize()``.
    """

    state_version = 2  # 2 added "shapes"; version 1 states still load
    state_versions = (1, 2)
    state_granularity = None  # weight states carry no "granularity" entry
    state_note = ""
    finalized_note = "its masks are permanent"

    def __init__(self, model: nn.Module, criterion: Importance, target_sparsity, schedule: Schedule, importance,
                 granularity, scope, exclude, data, loss_fn, regrow: Optional[Regrow] = None):
        if isinstance(granularity, str) and granularity.strip() in STRUCTURAL:
            raise ValueError(
                f"`granularity` must be {GRANULARITY_HELP} or 'channel', got {granularity!r}: the Pruner does "
                "not prune attention heads or layers progressively (use tp.prune for those)"
            )
        n_m, block = parse_granularity(granularity), parse_block(granularity)
        _check_regrow(regrow, n_m, block, criterion)
        target_sparsity = _checked_amount(target_sparsity, schedule, scope, n_m)
        layers, scope = target_layers(model, exclude, scope)
        layers = leave_out_tied(model, layers, scope, stacklevel=3)  # here, Pruner.__init__, the caller
        owners = weight_owners(model, layers, scope)
        check_supported(layers)
        if n_m is not None:
            check_n_m_divides(layers, n_m)
        if block is not None:
            check_blocks_divide(layers, block, criterion)
        if data is not None and criterion.requires_data:
            check_data_args(data, loss_fn, importance, criterion.requires_loss)
        else:
            refuse_unused_data(data, loss_fn, importance)
        unique = {name: layer for name, layer in layers.items() if owners[name] == name}
        dict_scope = isinstance(scope, Mapping)
        self.schedules = {name: schedule.resolved(float(scope[name]) if dict_scope else target_sparsity)
                          for name in unique}
        criterion.prepare(model, unique)  # e.g. BNScale finds its BatchNorms now, not mid-training

        self.model = model
        self.importance = criterion
        self.target_sparsity = target_sparsity
        self.schedule = schedule if dict_scope else schedule.resolved(target_sparsity)
        self.scope = scope
        self.layers = layers
        self._n_m = n_m
        self._block = block
        self._owners = owners
        self._unique = unique
        self._data = data
        self._loss_fn = loss_fn
        self._hooks = []
        self.regrow = None if regrow is None else regrow.resolved(schedule)
        self._dense = DenseGradients(layers, owners)
        self._held: Dict[str, tuple] = {}  # Adaptive: each layer's (mask, weight) at the sparsity that held
        for layer in layers.values():
            attach_mask(layer, current_mask(layer))
        criterion.reset()
        if criterion.requires_data and not criterion.requires_loss and data is None:
            self._observe_training_forwards()

    def _observe_training_forwards(self) -> None:
        self._hooks = [layer.register_forward_hook(ObservationHook(self)) for layer in self._unique.values()]

    def forward_hook(self, module, inputs, output) -> None:
        if module.training:
            self.importance.observe_forward(module, inputs, output)

    def sparsity(self, finalized: bool) -> float:
        zeros = total = 0
        for layer in self._unique.values():
            mask = current_mask(layer)
            zeros += int((~mask).sum()) if not finalized else int((layer.weight == 0).sum())
            total += mask.numel()
        return zeros / total if total else 0.0

    def observe_step(self) -> None:
        """Gradient criteria without ``data`` sum each layer's ``.grad`` at every step."""
        criterion = self.importance
        if criterion.requires_loss and self._data is None:
            for layer in self._unique.values():
                criterion.observe(layer)

    def is_update(self, step: int) -> bool:
        """Whether ``step`` is a pruning update of some layer's schedule or a regrowth step."""
        return (any(s.is_update(step) for s in self.schedules.values())
                or (self.regrow is not None and self.regrow.is_update(step)))

    def prepare(self, step: int) -> None:
        """Before training step ``step``: records the dense gradients during it if it is a regrowth step
        (and drops whatever an earlier step left recorded)."""
        self._dense.take()
        if self.regrow is not None and self.regrow.is_update(step):
            self._dense.arm()
        else:
            self._dense.disarm()

    def update(self, step: int) -> bool:
        gradients = self._dense.take()  # recorded during this step's backward, for regrowth
        check_finite_weights(self._unique)  # a diverged run: say which layer, before ranking noise
        criterion = self.importance
        criterion.prepare(self.model, self._unique)
        if self._data is not None:
            criterion.reset()
            with fail_together("scoring on the Pruner's `data`"):  # a rank's own data may fail alone
                observe(self.model, self._unique, criterion, self._data, self._loss_fn)
        current = {name: current_mask(layer) for name, layer in self._unique.items()}
        targets = {name: s.sparsity_at(step) for name, s in self.schedules.items()}
        if all(t == 0 for t in targets.values()):
            criterion.reset()
            return False
        if criterion.requires_data:  # each rank observed its own batches: rank on their average
            average_importance_state(criterion, self._unique)
        weights, regrown = {}, {}
        if getattr(criterion, "reconstructs", False):  # SparseGPT: new masks and new kept weights
            new, weights = self._reconstructed(current, targets)
        else:
            scores = {name: checked_score(criterion, name, layer, current[name])
                      for name, layer in self._unique.items()}
            new = self._select(scores, current, targets)
            if self.regrow is not None and self.regrow.is_update(step):
                new, regrown = self._regrown(scores, gradients, current, new, step)
        with torch.no_grad():  # every result exists: only now does the model change
            for name, weight in weights.items():
                self._unique[name].weight.copy_(weight)
            for name, back in regrown.items():  # a weight that comes back starts at zero
                self._unique[name].weight.masked_fill_(back, 0)
        for name, layer in self.layers.items():
            attach_mask(layer, new[self._owners[name]])
        criterion.reset()  # scores accumulate between updates
        return True

    def _regrown(self, scores, gradients, current, new, step):
        """RigL's swap in every layer: the masks ``new`` with `Regrow.fraction_at` of each layer's
        kept weights swapped for weights pruned in ``current`` (by dense gradient magnitude), and
        each layer's positions that came back."""
        missing = [name for name in self._unique if name not in gradients]
        if missing:
            raise RuntimeError(f"regrowth at step {step} needs the gradient of the training step just taken, and "
                               f"layer(s) {missing} got none: call pruner.step() after a forward and backward in "
                               "train mode")
        for name, gradient in gradients.items():
            problem = nonfinite(gradient)
            if problem is not None:
                raise FloatingPointError(f"regrowth at step {step}: the gradient of layer {name!r} has {problem}")
        average_(list(gradients.values()))  # under DDP every rank swaps by the same gradients
        fraction = self.regrow.fraction_at(step)
        masks, regrown = {}, {}
        for name in self._unique:
            count = int(round(fraction * int(new[name].sum())))
            masks[name], _ = selection.regrown(scores[name], gradients[name].abs(), current[name], new[name], count)
            regrown[name] = masks[name] & ~current[name]
        return masks, regrown

    def _reconstructed(self, current, targets):
        """New masks and weights from a reconstructing criterion at this update's ``targets``: N:M
        prunes the schedule's share of each group; ``scope="global"`` takes each layer's share
        from one ranking of every layer's scores, then reconstructs layer by layer."""
        criterion, masks, weights = self.importance, {}, {}
        if self.scope == "global" and self._n_m is None:
            scores = {name: checked_score(criterion, name, layer, current[name])
                      for name, layer in self._unique.items()}
            ranked = self._select(scores, current, targets)
            targets = selection.pruned_shares(ranked)
        for name, layer in self._unique.items():
            if self._n_m is not None:
                n, m = self._n_m
                pruned = min(int(round(targets[name] * m)), m - n)
                if pruned == 0:
                    masks[name] = current[name]
                    continue
                masks[name], weights[name] = criterion.reconstruct(layer, name, n_m=(m - pruned, m), kept=current[name])
            else:
                masks[name], weights[name] = criterion.reconstruct(layer, name, sparsity=targets[name],
                                                                   kept=current[name])
        return masks, weights

    def remember(self) -> None:
        """Keeps every layer's mask and weight: the sparsity that holds (`tp.schedules.Adaptive`)."""
        self._held = {name: (current_mask(layer).clone(), layer.weight.detach().clone())
                      for name, layer in self._unique.items()}

    def revert(self) -> None:
        """Back to the remembered masks: the weights pruned since come back with the values they
        had then (their optimizer moments are zero: the masked layers' optimizer hook zeroed them)."""
        with torch.no_grad():
            for name, layer in self._unique.items():
                mask, weight = self._held[name]
                back = mask & ~current_mask(layer)
                layer.weight[back] = weight[back].to(layer.weight.dtype)
        for name, layer in self.layers.items():
            attach_mask(layer, self._held[self._owners[name]][0])

    def check_across_ranks(self, step: int) -> None:
        """Under DDP: every rank holds the same masks after the update at ``step`` (else all raise)."""
        check_equal_across_ranks({name: current_mask(layer) for name, layer in self._unique.items()}, step)

    def after_step(self) -> None:
        """Nothing: masks keep pruned weights out of every forward pass by themselves."""

    def _select(self, scores, current, targets) -> Dict[str, torch.Tensor]:
        if self._block is None:
            return self._select_weights(scores, current, targets)
        return selection.by_blocks(lambda s, c: self._select_weights(s, c, targets), scores, current, self._block)

    def _select_weights(self, scores, current, targets) -> Dict[str, torch.Tensor]:
        names = list(scores)
        if self._n_m is not None:
            m = self._n_m[1]
            out = {}
            for name in names:
                pruned = min(int(round(targets[name] * m)), m - self._n_m[0])
                keep = m - pruned
                out[name] = current[name] if pruned == 0 else selection.n_of_m(scores[name], current[name], keep, m)
            return out
        if self.scope == "global":
            masks = selection.by_global_ratio([scores[k] for k in names], [current[k] for k in names],
                                              targets[names[0]])
            return dict(zip(names, masks))
        row_wise = getattr(self.importance, "compare_within_rows", False)
        by_ratio = selection.by_row_ratio if row_wise else selection.by_ratio
        return {k: by_ratio(scores[k], current[k], targets[k]) for k in names}

    def state_dict(self) -> dict:
        held = {name: {"mask": mask.clone(), "weight": weight.clone()} for name, (mask, weight) in self._held.items()}
        return {
            "layers": list(self._unique),
            "shapes": {name: list(layer.weight.shape) for name, layer in self._unique.items()},
            "importance": self.importance.state_dict(self._unique),
            **({"held": held} if held else {}),
        }

    def check_state(self, state: dict) -> None:
        """The state was saved for these layers, with these weight shapes (version 1 has no shapes)."""
        if state.get("layers") != list(self._unique):
            raise ValueError(f"`state` was saved for layers {state.get('layers')}, "
                             f"this Pruner prunes {list(self._unique)}")
        shapes = state.get("shapes")  # version 1 states have none
        for name, layer in self._unique.items() if shapes is not None else ():
            if list(shapes.get(name, ())) != list(layer.weight.shape):
                raise ValueError(f"`state` was saved for layer {name!r} with weight shape {shapes.get(name)}, but this "
                                 f"model's {name!r} has shape {list(layer.weight.shape)}")

    def load_state(self, state: dict) -> None:
        """Loads the criterion's statistics; if they do not load, leaves the criterion as it was."""
        by_name = state["importance"]
        held = {name: (entry["mask"].clone(), entry["weight"].clone()) for name, entry in state.get("held", {}).items()}
        for name, (mask, weight) in held.items():
            layer = self._unique.get(name)
            if layer is None or mask.shape != layer.weight.shape or weight.shape != layer.weight.shape:
                raise ValueError(f"`state['held']` has an entry for {name!r} that does not fit this Pruner's layers")
        before = self.importance.state_dict(self._unique)
        try:
            self.importance.reset()
            self.importance.load_state_dict(by_name, self._unique)
        except Exception:  # leave the criterion as it was
            self.importance.reset()
            self.importance.load_state_dict(before, self._unique)
            raise
        self._held = held

    def portable_state(self):
        """The criterion's statistics by layer name (they are keyed by module identity inside)."""
        return self.importance.state_dict(self._unique)

    def restore(self, by_name) -> None:
        """In a copy: re-keys the statistics to the copied layers and observes through this copy."""
        self.importance.reset()
        self.importance.load_state_dict(by_name, self._unique)
        if self._dense.armed:  # the copied layers hold inert copies of the gradient hooks: record through this copy
            self._dense.disarm()
            self._dense.arm()
        if self._hooks:  # the copied layers hold inert copies of the hooks: observe through this copy
            for handle in self._hooks:
                handle.remove()
            self._observe_training_forwards()

    def finalize(self) -> None:
        """Makes the masks permanent (pruned weights zero, plain layers back) and removes the hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._dense.disarm()
        for layer in self.layers.values():
            mask = get_mask(layer)
            if mask is not None:
                with torch.no_grad():
                    layer.weight.masked_fill_(~mask, 0)
                remove_mask(layer)
        self.importance.reset()


def _check_regrow(regrow: Optional[Regrow], n_m, block, criterion: Importance) -> None:
    """Regrowth swaps single weights ranked by the criterion's scores of the current weights."""
    if regrow is None:
        return
    if n_m is not None or block is not None:
        raise ValueError("`regrow` must be None with N:M or block granularity: regrowth swaps single weights "
                         "(granularity='weight')")
    if getattr(criterion, "reconstructs", False):
        raise ValueError(f"`regrow` must be None with importance {criterion!r}: it reconstructs the kept weights, "
                         "which regrowth would undo")
    if getattr(criterion, "compare_within_rows", False):
        raise ValueError(f"`regrow` must be None with importance {criterion!r}: it prunes the same share of every "
                         "row, which swaps across rows would break")


def _checked_amount(target_sparsity, schedule: Schedule, scope, n_m) -> Optional[float]:
    """The weight Pruner's final sparsity (None with a dict scope, whose values are checked instead)."""
    check_scope(scope)
    dict_scope = isinstance(scope, Mapping)
    if dict_scope and (target_sparsity is not None or schedule.final is not None):
        raise ValueError("with a dict `scope` the final sparsities come from it: pass target_sparsity=None "
                         "and a schedule without `final`")
    if dict_scope:
        check_dict_scope(scope)
    if n_m is not None and (dict_scope or scope != "layer"):
        raise ValueError(f"`scope` must be 'layer' for N:M granularity, got {scope!r}")
    return target_sparsity if dict_scope else check_target(target_sparsity, schedule, n_m)


class ObservationHook:
    """The forward hook through which a Pruner's weight strategy observes training forward passes.

    It holds the strategy weakly (a Pruner dropped without `finalize()` stops observing instead of
    accumulating forever), and a copy of it, made when the model is deep-copied or pickled, observes
    nothing: a copied model must not feed the original Pruner's statistics, and a copied Pruner
    registers hooks of its own on its copied layers.
    """

    def __init__(self, strategy: Optional[WeightStrategy]):
        self._strategy = weakref.ref(strategy) if strategy is not None else None

    def __call__(self, module, inputs, output) -> None:
        strategy = self._strategy() if self._strategy is not None else None
        if strategy is not None:
            strategy.forward_hook(module, inputs, output)

    def __reduce__(self):
        return ObservationHook, (None,)
