"""The demo's channel-pruning part: the trained CNN loses half of its channels, physically.

Whole filters and neurons go, so the result is a smaller dense model that ordinary dense kernels
run faster: no sparse kernel involved. Two ways with the same training budget:

* one-shot: ``tp.prune(model, sparsity=0.5, granularity="channel", importance="l2", example_inputs=x)``
  on the trained CNN, measured right away and after fine-tuning;
* progressive: ``tp.Pruner(model, 0.5, schedule, granularity="channel", importance="l2",
  example_inputs=x)`` zeroes channels in every tensor of their group while the model trains (the
  demo's cubic schedule), and ``pruner.finalize()`` removes them.

`section` writes this part of the report.
"""

from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import nn

from ..analysis import report, summary
from ..oneshot import prune
from ..pruner import Pruner
from .common import LR, Split, accuracy, progressive_schedule, train

__all__ = ["run", "section"]


def run(data: Split, budget: int, seed: int, dense: nn.Module, bar, target: float = 0.5) -> Dict:
    """Both methods on a copy of the trained ``dense`` CNN; test accuracies and the pruned models."""
    x_train, y_train, x_test, y_test = data
    example = (x_train[:1],)
    oneshot = prune(copy.deepcopy(dense), sparsity=target, granularity="channel", importance="l2",
                    example_inputs=example)
    result = {"one-shot": accuracy(oneshot, x_test, y_test)}
    train(oneshot, x_train, y_train, budget, LR, seed + 1, f"cnn: channels {target:.0%} fine-tune")
    result["one-shot + fine-tune"] = accuracy(oneshot, x_test, y_test)
    bar.update(1)

    model = copy.deepcopy(dense)
    pruner = Pruner(model, target, progressive_schedule(x_train, budget, target), importance="l2",
                    granularity="channel", example_inputs=example)
    train(model, x_train, y_train, budget, LR, seed + 1, f"cnn: channels {target:.0%} progressive", pruner)
    result["progressive, zeroed (before finalize)"] = accuracy(model, x_test, y_test)
    pruner.finalize()
    result["progressive"] = accuracy(model, x_test, y_test)
    result["models"] = {"one-shot + fine-tune": oneshot, "progressive": model}
    bar.update(1)
    return result


def _widths(model: nn.Module) -> str:
    """Output channels / features of each conv and linear layer, e.g. '16-32-64-10'."""
    return "-".join(str(m.weight.shape[0]) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def section(dense: nn.Module, dense_accuracy: float, result: Dict, example: torch.Tensor, repeats: int = 100) -> str:
    """The report's Markdown section: accuracy, widths, parameters, MACs and latency, dense vs pruned."""
    models = result["models"]
    rows = []
    for method, model, acc, before in [
        ("dense", dense, dense_accuracy, "-"),
        ("one-shot + fine-tune", models["one-shot + fine-tune"], result["one-shot + fine-tune"],
         f"{result['one-shot']:.2f}"),
        ("progressive (channel Pruner)", models["progressive"], result["progressive"], "-"),
    ]:
        totals = summary(model, example_inputs=example[:1]).totals
        rows.append([method, _widths(model), f"{acc:.2f}", before, totals["params"], totals["macs_dense"]])
    table = report.markdown_table(["Method", "Widths", "Test acc. (%)", "Before fine-tune (%)", "Params", "MACs"],
                                  rows, "llrrrr")
    latency = report.latency_section({
        "CNN dense": dense,
        "CNN 50% channels, one-shot + fine-tune": models["one-shot + fine-tune"],
        "CNN 50% channels, progressive": models["progressive"],
    }, example, repeats=repeats)
    return f"""## Channel pruning (CNN, 50% of the channels)

Whole filters and neurons removed: the pruned CNN is a smaller dense model (widths: the output
channels/features of each conv and linear layer) that runs faster on ordinary dense kernels. The
channel groups come from `tp.DependencyGraph` (a conv1 filter goes with conv2's input channel, a
conv2 filter with its 16 features of the flattened map), ranked by the L2 norm over every member of
the group (`importance="l2"`); the output layer keeps its 10 classes. Both methods get the budget
above:

- **one-shot + fine-tune**: `tp.prune(model, sparsity=0.5, granularity="channel", importance="l2",
  example_inputs=...)` on the trained CNN, measured right away ("before fine-tune") and after fine-tuning;
- **progressive**: `tp.Pruner(model, 0.5, schedule, granularity="channel", importance="l2",
  example_inputs=...)` with the cubic schedule above: channels are zeroed in every tensor of their group
  while the model trains, and `pruner.finalize()` removes them (test accuracy just before it:
  {result['progressive, zeroed (before finalize)']:.2f}%, after: {result['progressive']:.2f}%).

MACs per sample.

{table}

{latency}"""
