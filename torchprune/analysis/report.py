"""Plots and Markdown for pruning reports: what a person would rather see than a list of numbers.

Every plot function writes a PNG to ``path`` (matplotlib, Agg backend) and returns the path; the
Markdown helpers return strings. The demo (`torchprune.demo`) assembles them into report.md.

>>> report.plot_accuracy_vs_sparsity({"one-shot": {0.5: 97.1, 0.9: 71.0}}, path="acc.png", dense=97.8)
>>> print(report.latency_section({"dense": model, "pruned": pruned}, torch.randn(64, 64)))
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..importance import Importance, resolve
from ..masking import effective_weight, get_mask, prunable_layers
from ..nn.sparse import SparseLayer
from ..schedules import plot as plot_schedules
from ..timing import sample_interleaved, warm_up

__all__ = [
    "markdown_table",
    "plot_schedule",
    "plot_accuracy_vs_sparsity",
    "plot_layer_sparsity",
    "plot_importance_histograms",
    "plot_input_pixels",
    "measure_latency",
    "latency_section",
]


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed), imported on first use:
    matplotlib is an optional dependency."""
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path) -> str:
    """Writes ``figure`` to ``path`` as a PNG, closes it (pyplot keeps every open figure) and returns the path."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return str(path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: Optional[str] = None) -> str:
    """A GitHub-flavoured Markdown table; ``align`` is one character per column ("l" or "r"),
    numbers right-aligned by default."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError("`headers`, `align` and every row must have the same number of columns")
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))
    if len(align) != len(headers):
        raise ValueError("`headers`, `align` and every row must have the same number of columns")

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_schedule(schedules, steps: int, path, title: str = "Sparsity schedule") -> str:
    """The sparsity targets of one schedule or a ``{label: schedule}`` dict over ``steps``."""
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6, 3.5))
    plot_schedules(schedules, steps=steps, ax=ax, title=title)
    return save_figure(figure, path)


def plot_accuracy_vs_sparsity(curves: Mapping[str, Mapping[float, float]], path, dense: Optional[float] = None,
                              title: str = "Accuracy vs sparsity", ylabel: str = "test accuracy (%)") -> str:
    """One line per method ({label: {sparsity: accuracy}}), the dense model as a dashed line."""
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        xs = sorted(curve)
        ax.plot([100 * x for x in xs], [curve[x] for x in xs], marker="o", label=label)
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="--", label=f"dense ({dense:.2f})")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(figure, path)


def _layer_sparsities(model: nn.Module) -> Dict[str, float]:
    out = {}
    for name, layer in prunable_layers(model).items():
        weight = effective_weight(layer)
        out[name] = float((weight == 0).sum()) / weight.numel()
    return out


def plot_layer_sparsity(models: Union[nn.Module, Mapping[str, nn.Module]], path,
                        title: str = "Sparsity per layer") -> str:
    """Grouped bars: the sparsity of each prunable layer, for one model or ``{label: model}``."""
    if isinstance(models, nn.Module):
        models = {"model": models}
    plt = pyplot()
    per_model = {label: _layer_sparsities(m) for label, m in models.items()}
    names = list(next(iter(per_model.values())))
    figure, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 3.8))
    width = 0.8 / len(per_model)
    for i, (label, values) in enumerate(per_model.items()):
        xs = [j + (i - (len(per_model) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [100 * values.get(n, 0.0) for n in names], width, label=label)
        for bar, n in zip(bars, names):
            ax.annotate(f"{100 * values.get(n, 0.0):.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    shapes = {name: "x".join(str(d) for d in layer.weight.shape)
              for name, layer in prunable_layers(next(iter(models.values()))).items()}
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n{shapes.get(n, '')}" for n in names], fontsize=8)
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    if len(per_model) > 1:
        ax.legend(fontsize=8)
    return save_figure(figure, path)


def plot_importance_histograms(model: nn.Module, path, importance: Union[str, Importance] = "magnitude",
                               sparsity: Optional[float] = None, title: str = "Importance per layer") -> str:
    """One histogram per prunable layer of log10(score) under a weight criterion (magnitude by
    default). With ``sparsity``, a red line marks the global threshold one-shot pruning to that
    sparsity would use: what lies left of it in each layer is what that layer would lose."""
    criterion = resolve(importance)
    if criterion.requires_data:
        raise ValueError(f"`importance` must be a weight criterion (no data), got {criterion!r}")
    layers = prunable_layers(model)
    scores = {name: criterion(layer).detach().double().flatten().cpu() for name, layer in layers.items()}
    threshold = None
    if sparsity is not None:
        joined = torch.sort(torch.cat(list(scores.values()))).values
        count = int(round(sparsity * joined.numel()))
        threshold = float(joined[count]) if count < joined.numel() else None
    plt = pyplot()
    columns = min(3, len(scores))
    rows = math.ceil(len(scores) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False)
    floor = 1e-8  # log10 of exact zeros (already pruned weights) is drawn at -8
    for ax, (name, values) in zip(axes.flat, scores.items()):
        ax.hist(torch.log10(values.clamp(min=floor)).numpy(), bins=50, color="tab:blue")
        if threshold is not None and threshold > 0:
            ax.axvline(math.log10(threshold), color="tab:red")
            lost = float((values < threshold).double().mean())
            ax.set_title(f"{name}: {100 * lost:.0f}% below", fontsize=9)
        else:
            ax.set_title(name, fontsize=9)
        ax.set_xlabel("log10 score", fontsize=8)
    for ax in list(axes.flat)[len(scores):]:
        ax.axis("off")
    suffix = f" (global threshold for {100 * sparsity:g}%)" if sparsity is not None else ""
    figure.suptitle(title + suffix, fontsize=10)
    return save_figure(figure, path)


def plot_input_pixels(layers: Union[nn.Linear, Mapping[str, nn.Linear]], path, image_shape=(8, 8),
                      mean_image: Optional[torch.Tensor] = None,
                      title: str = "Which input pixels the pruned model still reads") -> str:
    """The interpretability view: for the first Linear layer of a model over flattened images (one,
    or ``{label: layer}`` to compare), the number of surviving weights that read each pixel, drawn
    as an image, with the mean input image beside it when given."""
    if isinstance(layers, nn.Module):
        layers = {"kept weights per pixel": layers}
    if not isinstance(layers, Mapping) or not layers:
        raise TypeError("`layers` must be an nn.Linear or a non-empty dict {label: nn.Linear}")
    height, width = image_shape
    for layer in layers.values():
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"`layers` must be the models' first nn.Linear, got {type(layer).__name__}")
        if layer.in_features != height * width:
            raise ValueError(f"`image_shape` {tuple(image_shape)} does not match in_features={layer.in_features}")
    plt = pyplot()
    panels = len(layers) + (mean_image is not None)
    figure, axes = plt.subplots(1, panels, figsize=(3.6 * panels + 0.6, 3.6), squeeze=False)
    if mean_image is not None:
        ax = axes[0, 0]
        image = ax.imshow(mean_image.reshape(height, width).cpu().numpy(), cmap="gray_r")
        ax.set_title("mean input image", fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.046)
    for ax, (label, layer) in zip(list(axes.flat)[panels - len(layers):], layers.items()):
        kept = (effective_weight(layer) != 0).sum(0).view(height, width).cpu()
        image = ax.imshow(kept.numpy(), cmap="viridis", vmin=0, vmax=max(1, int(kept.max())))
        dead = int((kept == 0).sum())
        ax.set_title(f"{label}\n({dead} of {height * width} pixels ignored)", fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.046)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def measure_latency(model: nn.Module, example_input: torch.Tensor, repeats: int = 50,
                    warmup: int = 5) -> Dict[str, float]:
    """Median and spread of the forward time of ``model(example_input)`` in eval mode under
    ``inference_mode``, in milliseconds: {"median_ms", "min_ms", "max_ms"}. Timed with
    ``torchprune.timing`` on the host clock without a device synchronize: a CPU measurement."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive int, got {repeats!r}")
    was_training = model.training
    model.eval()
    runner = {"model": lambda: model(example_input)}
    try:
        with torch.inference_mode():
            warm_up(runner, warmup)
            times = [1000 * seconds for seconds in sample_interleaved(runner, repeats)["model"]]
    finally:
        model.train(was_training)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def latency_section(models: Mapping[str, nn.Module], example_input: torch.Tensor, repeats: int = 50) -> str:
    """A Markdown section timing each ``{label: model}`` on ``example_input``, with the ratio to the
    first model (the reference, usually the dense one)."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError("`models` must be a non-empty dict {label: model}")
    rows, reference = [], None
    for label, model in models.items():
        result = measure_latency(model, example_input, repeats=repeats)
        reference = reference or result["median_ms"]
        masked = sum(get_mask(m) is not None for m in model.modules())
        sparse = sum(isinstance(m, SparseLayer) for m in model.modules())
        rows.append([label, f"{result['median_ms']:.3f}", f"{result['min_ms']:.3f}-{result['max_ms']:.3f}",
                     f"{reference / result['median_ms']:.2f}x", masked, sparse])
    shape = "x".join(str(d) for d in example_input.shape)
    threads = torch.get_num_threads()
    table = markdown_table(["Model", "Median (ms)", "Range (ms)", "Speed vs first", "Masked layers", "Sparse layers"],
                           rows, "lrrrrr")
    return (f"Forward pass on one batch of shape {shape}, {repeats} repeats after warm-up, "
            f"{threads} CPU thread(s), eval mode under inference_mode.\n\n{table}")
