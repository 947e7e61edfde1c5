"""The demo's adaptive runs, on the MLP: a schedule driven by the model's accuracy against fixed ones,
and dynamic sparsity with regrowth (RigL) against prune-only at 95%.

* `adaptive`: `tp.schedules.Adaptive` raises the global sparsity every epoch while the accuracy
  on a validation split (a fifth of the training images, never the test images, unseen by the
  dense model too) stays within one point of its best, and goes back to the last sparsity that
  held when it does not recover. A fixed cubic schedule to the sparsity it found, on the same
  images and budget, is the comparison.
* `auto_vs_uniform`: `tp.auto` with a latency budget of half the dense MLP's (on the whole test
  set in one batch, as `accuracy` calls it, on this machine) chooses each layer's sparsity from the validation
  accuracy; against it, uniform sparsity at several levels, the same one-shot magnitude pruning and
  fine-tuning, compared at the plan's measured latency (uniform interpolated between the two levels
  that bracket it; a plan that gives every layer one of those levels is that uniform model, a tie).
* `rigl`: progressive magnitude pruning to 95% (the sweep's cubic schedule), with and without
  ``regrow=tp.Regrow(0.1, ...)``, from dense MLPs trained with three seeds. The fraction 0.1 was
  chosen over 0.05, 0.2 and 0.3 (and over a longer or sparser regrowth) on that validation split,
  seeds 0-2, never on the test images.
"""

from __future__ import annotations

import copy
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from ..analysis import report
from ..analysis.auto import auto, interpolate, latency_against_dense
from ..analysis.model_summary import sparsity as model_sparsity
from ..masking import masks
from ..oneshot import prune
from ..pruner import Pruner
from ..regrowth import Regrow
from ..schedules import Adaptive, Cubic
from ..sparsify import sparsify
from .common import BATCH, LR, Split, accuracy, make_mlp, progressive_schedule, train

__all__ = ["fit_dense", "adaptive", "auto_vs_uniform", "rigl", "section", "auto_section", "validation_split",
           "TOLERANCE", "RIGL_TARGET", "RIGL_SEEDS", "AUTO_BUDGET", "UNIFORM"]

#: The adaptive schedule's tolerance: validation accuracy within this many points of its best holds.
TOLERANCE = 1.0
#: RigL against prune-only: the sparsity, and the seeds of the dense models.
RIGL_TARGET = 0.95
RIGL_SEEDS = (0, 1, 2)
#: tp.auto's latency budget (a fraction of dense) and the uniform sparsities it is compared with.
AUTO_BUDGET = 0.5
UNIFORM = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def validation_split(x: torch.Tensor, y: torch.Tensor, seed: int, fraction: float = 0.2
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_fit, y_fit, x_val, y_val): ``fraction`` of the images held out, in a seeded random order."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held = int(round(fraction * len(x)))
    return x[order[held:]], y[order[held:]], x[order[:held]], y[order[:held]]


def _evaluator(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Validation accuracy in percent, leaving the model in the mode it was in (the metric is read mid-epoch)."""
    def metric() -> float:
        was_training = model.training
        try:
            return accuracy(model, x, y)
        finally:
            model.train(was_training)
    return metric


def fit_dense(flat: Split, epochs: int, seed: int) -> nn.Module:
    """The dense MLP trained on four fifths of the training images (`validation_split`), so that
    the fifth held out is a fair validation set for what is chosen on it."""
    x_fit, y_fit, _, _ = validation_split(flat[0], flat[1], seed)
    torch.manual_seed(seed)
    dense = make_mlp()
    train(dense, x_fit, y_fit, epochs, LR, seed, "mlp: dense on the fit split")
    return dense


def adaptive(dense: nn.Module, flat: Split, budget: int, seed: int) -> Dict:
    """From ``dense`` (`fit_dense`), ``budget`` epochs under the adaptive schedule (a check every
    epoch on the held-out fifth, sparsity rising over the first two thirds, as the fixed schedules
    do) and under a fixed cubic schedule to the sparsity it reached; test accuracies, the sparsity
    and the schedule's history."""
    x_train, y_train, x_test, y_test = flat
    x_fit, y_fit, x_val, y_val = validation_split(x_train, y_train, seed)
    steps_per_epoch = -(-len(x_fit) // BATCH)
    model = copy.deepcopy(dense)
    schedule = Adaptive(_evaluator(model, x_val, y_val), begin=0, end=(2 * budget * steps_per_epoch) // 3,
                        every=steps_per_epoch, final=0.99, increment=0.1, tolerance=TOLERANCE)
    pruner = Pruner(model, 0.99, schedule, importance="magnitude", scope="global")
    train(model, x_fit, y_fit, budget, LR, seed + 1, "mlp: adaptive schedule", pruner)
    reached = pruner.sparsity
    fixed = copy.deepcopy(dense)
    fixed_pruner = Pruner(fixed, reached, progressive_schedule(x_fit, budget, reached), importance="magnitude",
                          scope="global")
    train(fixed, x_fit, y_fit, budget, LR, seed + 1, f"mlp: fixed cubic to {reached:.1%}", fixed_pruner)
    return {
        "sparsity": reached, "fixed sparsity": fixed_pruner.sparsity,
        "test": {"dense": accuracy(dense, x_test, y_test), "adaptive": accuracy(model, x_test, y_test),
                 "fixed": accuracy(fixed, x_test, y_test)},
        "validation": {"dense": accuracy(dense, x_val, y_val), "adaptive": accuracy(model, x_val, y_val),
                       "fixed": accuracy(fixed, x_val, y_val)},
        "history": pruner.schedule.history, "every": steps_per_epoch, "tolerance": TOLERANCE,
    }


def auto_vs_uniform(dense: nn.Module, flat: Split, budget: int, seed: int, repeats: int = 100) -> Dict:
    """`tp.auto` at `AUTO_BUDGET` of ``dense``'s latency (the test images in one batch; validation accuracy
    as the metric) against each of `UNIFORM`: each pruned one-shot by magnitude, fine-tuned for
    ``budget`` epochs, sparsified and timed against dense, interleaved."""
    x_train, y_train, x_test, y_test = flat
    x_fit, y_fit, x_val, y_val = validation_split(x_train, y_train, seed)
    example = x_test  # at a batch of 64 the MLP's ~0.2 ms are mostly call overhead: uniform 98% measured 0.55x
    plan = auto(dense, lambda m: accuracy(m, x_val, y_val), AUTO_BUDGET, example, progress=False, repeats=repeats)
    rows, models, levels = {}, {}, {}
    for label, scope in [("auto", plan.scope)] + [(f"uniform {s:.0%}", s) for s in UNIFORM]:
        model = copy.deepcopy(dense)
        if isinstance(scope, dict):
            prune(model, scope=scope)
        else:
            prune(model, scope)
            levels[label] = {name: scope for name in masks(model)}
        train(model, x_fit, y_fit, budget, LR, seed + 1, f"mlp: {label} fine-tune")
        rows[label] = {"sparsity": model_sparsity(model), "test": accuracy(model, x_test, y_test)}
        models[label] = sparsify(model, example_inputs=example).eval()
    ratios, dense_seconds = latency_against_dense(dense, models, (example,), repeats)
    for label, row in rows.items():
        row["latency"] = ratios[label]
    # a plan that gives every layer the same level is that uniform model (same masks, same fine-tuning):
    # a tie, whatever the two timings say; interpolating would turn their noise into points
    twin = next((label for label, scope in levels.items() if scope == plan.scope), None)
    at_plan = rows[twin]["test"] if twin else interpolate(
        [(r["latency"], r["test"]) for k, r in rows.items() if k != "auto"], rows["auto"]["latency"])
    return {"plan": plan.to_markdown(), "scope": plan.scope, "rows": rows, "dense ms": dense_seconds * 1e3,
            "dense": accuracy(dense, x_test, y_test), "uniform at plan latency": at_plan, "same as": twin,
            "budget": AUTO_BUDGET, "batch": len(example)}


def rigl(flat: Split, epochs: Tuple[int, int], seeds: Sequence[int] = RIGL_SEEDS, target: float = RIGL_TARGET) -> Dict:
    """For each seed: a dense MLP trained for ``epochs[0]`` epochs, then ``epochs[1]`` epochs of
    progressive pruning to ``target`` without and with regrowth; test accuracies by seed."""
    x_train, y_train, x_test, y_test = flat
    dense_epochs, budget = epochs
    schedule = progressive_schedule(x_train, budget, target)  # fixed curves: every Pruner may share them
    regrow = _regrow(schedule, x_train, budget)
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        dense = make_mlp()
        train(dense, x_train, y_train, dense_epochs, LR, seed, f"mlp: dense, seed {seed}")
        row = {"seed": seed, "dense": accuracy(dense, x_test, y_test)}
        for label, swaps in (("prune-only", None), ("rigl", regrow)):
            model = copy.deepcopy(dense)
            pruner = Pruner(model, target, schedule, importance="magnitude", scope="global", regrow=swaps)
            train(model, x_train, y_train, budget, LR, seed + 1, f"mlp: {label} {target:.0%}, seed {seed}", pruner)
            row[label] = accuracy(model, x_test, y_test)
            row[f"{label} sparsity"] = pruner.sparsity
        rows.append(row)
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("dense", "prune-only", "rigl")}
    return {"target": target, "rows": rows, "mean": mean, "regrow": repr(regrow)}


def _regrow(schedule: Cubic, x_train: torch.Tensor, budget: int) -> Regrow:
    """10% swapped at first, cosine-decayed (RigL's decay), at every mask update of the schedule and
    on at the same pace after it, until three quarters of the run."""
    steps = budget * -(-len(x_train) // BATCH)
    return Regrow(0.1, every=schedule.every, begin=schedule.begin, end=max(schedule.end, (3 * steps) // 4))


def section(found: Dict, rigl_result: Dict) -> str:
    """The report's "Adaptive pruning" section: the adaptive schedule's checks and result against the
    fixed schedule, and RigL against prune-only by seed."""
    test, val = found["test"], found["validation"]
    checks = report.markdown_table(
        ["Step", "Validation acc. (%)", "Sparsity after", "Action"],
        [[r["step"], f"{r['metric']:.2f}", f"{99 * r['level']:.1f}%", r["action"]] for r in found["history"]], "rrrl")
    drop = test["dense"] - test["adaptive"]
    rows = [[f"seed {r['seed']}", f"{r['dense']:.2f}", f"{r['prune-only']:.2f}", f"{r['rigl']:.2f}",
             f"{r['rigl'] - r['prune-only']:+.2f}"] for r in rigl_result["rows"]]
    mean = rigl_result["mean"]
    rows.append(["mean", f"{mean['dense']:.2f}", f"{mean['prune-only']:.2f}", f"{mean['rigl']:.2f}",
                 f"{mean['rigl'] - mean['prune-only']:+.2f}"])
    lead = mean["rigl"] - mean["prune-only"]
    return "\n".join([
        "## Adaptive pruning (MLP)",
        "",
        "### A schedule driven by accuracy against a fixed one",
        "",
        "`tp.schedules.Adaptive` checks the accuracy on a validation split (a fifth of the training images; the",
        "dense model for this comparison is trained on the other four fifths) once per epoch over the first two",
        "thirds of the budget. It raises the global sparsity by a tenth of the way to 99% while the accuracy",
        f"stays within {found['tolerance']:g} point of its best, pauses when it drops, and goes back to the last",
        "sparsity that held when the model does not recover within three checks. Then a fixed cubic schedule",
        "prunes to the sparsity the adaptive one found, with the same images and epochs.",
        "",
        checks,
        "",
        f"- Adaptive: {100 * found['sparsity']:.1f}% sparse, test accuracy {test['adaptive']:.2f}% "
        f"(validation {val['adaptive']:.2f}%); dense {test['dense']:.2f}% (validation {val['dense']:.2f}%): "
        f"{drop:.2f} points below dense on the test images, target <= 1: **{'met' if drop <= 1 else 'missed'}**.",
        f"- Fixed cubic to the same {100 * found['fixed sparsity']:.1f}%: test accuracy {test['fixed']:.2f}% "
        f"(validation {val['fixed']:.2f}%).",
        "",
        f"### Regrowth (RigL) against prune-only at {rigl_result['target']:.0%}",
        "",
        "Progressive global magnitude pruning (the sweep's cubic schedule) from dense MLPs trained with three",
        f"seeds, without and with `regrow={rigl_result['regrow']}`: at each regrowth step the",
        "weakest kept weights go and as many pruned ones with the largest gradient come back, at zero.",
        "",
        report.markdown_table(["Dense model", "Dense (%)", "Prune-only (%)", "RigL (%)", "RigL - prune-only"],
                              rows, "lrrrr"),
        "",
        f"RigL is {lead:+.2f} points from prune-only on average (target >= +1): "
        f"**{'met' if lead >= 1 else 'missed'}**.",
    ])


def auto_section(found: Dict) -> str:
    """The report's tp.auto section: the plan, and auto against uniform at the measured latencies."""
    rows = found["rows"]
    table = report.markdown_table(
        ["Model", "Sparsity", "Latency / dense", "Test acc. (%)"],
        [[label, f"{100 * r['sparsity']:.1f}%", f"{r['latency']:.3f}", f"{r['test']:.2f}"]
         for label, r in rows.items()],
        "lrrr")
    at_plan, mine, twin = found["uniform at plan latency"], rows["auto"], found.get("same as")
    if twin:
        verdict = (f"the plan gives every layer the same sparsity as {twin}: it is that model ({mine['test']:.2f}%), "
                   f"so at equal latency it is a tie (**not better**); the two measured {mine['latency']:.3f} and "
                   f"{rows[twin]['latency']:.3f} of dense, timing noise")
    elif at_plan is None:
        verdict = "no two uniform levels bracket the plan's measured latency"
    else:
        verdict = (f"uniform sparsity at the plan's measured latency ({mine['latency']:.3f} of dense) would reach "
                   f"{at_plan:.2f}% (interpolated); the plan {mine['test']:.2f}%: {mine['test'] - at_plan:+.2f} points "
                   f"(**{'better' if mine['test'] > at_plan else 'not better'}**)")
    return "\n".join([
        "### tp.auto against uniform sparsity at the same latency",
        "",
        f"`tp.auto(model, evaluate, budget={found['budget']}, example_inputs=the {found['batch']} test images)`",
        "measures each layer's validation-accuracy curve and times each layer's dense and sparse kernels at",
        "its real input shape, then picks per-layer sparsities (see `torchprune/analysis/auto.py`). Every model",
        "below is pruned one-shot by magnitude, fine-tuned like the others, sparsified with the example batch and",
        f"timed against dense (dense: {found['dense ms']:.3f} ms per batch of {found['batch']}).",
        "",
        found["plan"],
        "",
        table,
        "",
        f"- Budget {found['budget']} of dense latency: measured {mine['latency']:.3f} "
        f"(**{'met' if mine['latency'] <= found['budget'] else 'missed'}**).",
        f"- {verdict}.",
    ])
