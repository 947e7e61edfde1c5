"""The demo's write-up: PNG plots, latency tables, report.md and results.json from a `DemoResult`.

Everything here reads the trained models and accuracies; nothing trains. The timing (latency tables,
`sparsify(example_inputs=...)`) runs here too, because its only output is the report.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Dict, Tuple

import torch
from torch import nn

from ..analysis import report, summary
from ..analysis import sparsity as model_sparsity
from ..masking import effective_weight
from ..sparsify import sparsify
from . import adaptive, channels
from .common import BATCH, LR, METHODS, SPARSITIES, DemoResult, Sweep

__all__ = ["write", "pixel_statistics"]

#: report.md; the fields are filled by `report_text`.
REPORT = """# torchprune demo: pruning models trained on handwritten digits

Data: scikit-learn's bundled 8x8 handwritten digits (1,797 real images), a stratified 75/25 split
(seed {seed}). Models: an MLP 64-300-100-10 and a CNN (conv 16, conv 32, max-pool, 512-64-10).
Dense training: {mlp_epochs} (MLP) / {cnn_epochs} (CNN) epochs of Adam. After pruning every method
gets the same budget of {mlp_budget} (MLP) / {cnn_budget} (CNN) epochs. Learning rate {lr:g} throughout
(after pruning it was chosen over 5e-4 on a validation split of the training images, never on the test images):

- **one-shot**: global magnitude pruning of the trained model (`tp.prune(model, sparsity, scope="global")`),
  measured right away ("before fine-tune") and after fine-tuning;
- **progressive**: `tp.Pruner` with global magnitude importance and the Zhu & Gupta cubic schedule
  over the first two thirds of the budget, then training at the final sparsity.
{quick_note}
## Accuracy, parameters and MACs

Sparsity is over the prunable layers' weights; params/nonzeros count biases too; MACs per sample.

{table}

![accuracy vs sparsity, MLP]({mlp_accuracy})
![accuracy vs sparsity, CNN]({cnn_accuracy})

## Targets

{targets}

## The schedule

![schedule]({schedule})

## Where the pruning lands

Global ranking gives each layer its own sparsity (labels: layer name and weight shape).

![per-layer sparsity, MLP]({layers})
![per-layer sparsity, CNN]({layers_cnn})

Magnitudes of the dense MLP's weights per layer; the red line is the global threshold for 90%.

![importance histograms]({histograms})

## What the pruned MLP reads

Kept first-layer weights per input pixel of the MLP at 95% sparsity, beside the mean training image.
A weight on a pixel that is blank in every training image gets no gradient, so it keeps its random
initial size, and magnitude pruning can keep it although it never contributes; Wanda scores it
|w| * ||x|| = 0. Measured:

{pixels}

![input pixels]({pixels_plot})

## Latency

Masked models compute with the full weight tensors and a mask (torchprune's masked C++ ops), so
masking alone does not make them faster; the tables measure what it costs. `tp.sparsify()` swaps
pruned layers for packed sparse layers (`tp.nn.SparseLinear` / `SparseConv2d`, C++ sparse
kernels): with `example_inputs` it times each layer at this batch and keeps whichever is faster,
with `min_sparsity=0.5` it swaps every pruned layer. These demo layers are tiny (at most 300x100
weights), where a dense GEMM's fixed costs are small and a sparse kernel has little to save: see
the README's benchmarks for layers of real size.

{latency}

{latency_cnn}

{channels}

{adaptive}

Total time {elapsed:.1f} s.
"""


def write(out: str, result: DemoResult, start: float) -> Dict:
    """Writes ``out``/report.md, its PNGs and results.json, prints the targets and where the report is;
    returns what results.json holds. ``start`` is the demo's ``time.perf_counter()`` at its start."""
    plots = make_plots(out, result)
    latency, latency_cnn = latency_sections(result)
    channel_text = channels.section(result.cnn.models["dense"], result.cnn.dense, result.channels,
                                    result.images[2][:BATCH], repeats=result.repeats)
    elapsed = time.perf_counter() - start
    texts = {"table": accuracy_table(result), "latency": latency, "latency_cnn": latency_cnn,
             "channels": channel_text, "adaptive": "\n\n".join([adaptive.section(result.adaptive, result.rigl),
                                      adaptive.auto_section(result.adaptive["auto"])])}
    results = results_json(result, elapsed)
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write(report_text(result, plots, texts, elapsed))
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"\n{targets_text(result.mlp)}")
    print(f"\nreport: {os.path.join(out, 'report.md')} (done in {elapsed:.1f} s)")
    return results


def make_plots(out: str, result: DemoResult) -> Dict[str, str]:
    """The report's PNGs, written into ``out``: {field of `REPORT`: path}."""
    mlp, cnn = result.mlp, result.cnn
    path = functools.partial(os.path.join, out)
    return {
        "schedule": report.plot_schedule({f"cubic to {t:.0%}": mlp.schedules[t] for t in SPARSITIES},
                                         steps=result.epochs["mlp"][1] * -(-len(result.flat[0]) // BATCH),
                                         path=path("schedule.png"),
                                         title="Progressive runs: sparsity target per training step (MLP)"),
        "mlp_accuracy": report.plot_accuracy_vs_sparsity(
            curves(mlp), path("accuracy_mlp.png"), dense=mlp.dense, title="MLP 64-300-100-10: accuracy vs sparsity"),
        "cnn_accuracy": report.plot_accuracy_vs_sparsity(
            curves(cnn), path("accuracy_cnn.png"), dense=cnn.dense, title="Small CNN: accuracy vs sparsity"),
        "layers": report.plot_layer_sparsity(
            {f"{t:.0%}": mlp.models[("progressive", t)] for t in SPARSITIES}, path("layer_sparsity_mlp.png"),
            title="MLP, progressive global magnitude: sparsity per layer"),
        "layers_cnn": report.plot_layer_sparsity(
            {f"{t:.0%}": cnn.models[("progressive", t)] for t in SPARSITIES}, path("layer_sparsity_cnn.png"),
            title="CNN, progressive global magnitude: sparsity per layer"),
        "histograms": report.plot_importance_histograms(
            mlp.models["dense"], path("importance_mlp.png"), sparsity=0.9, title="Dense MLP: |w| per layer"),
        "pixels_plot": report.plot_input_pixels(
            {"progressive magnitude": mlp.models[("progressive", 0.95)][0],
             "one-shot Wanda (per row) + fine-tune": result.wanda.model[0]}, path("input_pixels.png"),
            mean_image=result.mean_image, title="MLP at 95%: which input pixels it still reads"),
    }


def latency_sections(result: DemoResult) -> Tuple[str, str]:
    """The MLP's and the CNN's latency tables: {label: model} timed on one batch of test images, the
    first entry the reference for the speed column.

    ``sparsify(example_inputs=...)`` times each layer and keeps the sparse kernel only where it wins at
    this batch; ``min_sparsity=0.5`` swaps every pruned layer, to show the kernels themselves.
    """
    example_mlp, example_cnn = result.flat[2][:BATCH], result.images[2][:BATCH]
    mlp90, mlp95 = result.mlp.models[("progressive", 0.9)], result.mlp.models[("progressive", 0.95)]
    cnn90 = result.cnn.models[("progressive", 0.9)]
    latency = report.latency_section({
        "MLP dense": result.mlp.models["dense"],
        "MLP 90% progressive (masked)": mlp90,
        "MLP 90% sparsify(example_inputs)": sparsify(mlp90, example_inputs=example_mlp),
        "MLP 90% sparsify(min_sparsity=0.5)": sparsify(mlp90, min_sparsity=0.5),
        "MLP 95% progressive (masked)": mlp95,
        "MLP 95% sparsify(example_inputs)": sparsify(mlp95, example_inputs=example_mlp),
        "MLP 95% sparsify(min_sparsity=0.5)": sparsify(mlp95, min_sparsity=0.5),
    }, example_mlp, repeats=result.repeats)
    latency_cnn = report.latency_section({
        "CNN dense": result.cnn.models["dense"],
        "CNN 90% progressive (masked)": cnn90,
        "CNN 90% sparsify(example_inputs)": sparsify(cnn90, example_inputs=example_cnn),
        "CNN 90% sparsify(min_sparsity=0.5)": sparsify(cnn90, min_sparsity=0.5),
    }, example_cnn, repeats=result.repeats)
    return latency, latency_cnn


def report_text(result: DemoResult, plots: Dict[str, str], texts: Dict[str, str], elapsed: float) -> str:
    """report.md: `REPORT` filled with the run's settings, the plots' file names and ``texts`` (the
    accuracy table, the latency tables and the channel section)."""
    mlp, wanda, mean_image = result.mlp, result.wanda, result.mean_image
    pixels = "\n".join([
        "- Progressive magnitude: " + pixels_text(pixel_statistics(mlp.models[("progressive", 0.95)][0], mean_image)),
        f"- One-shot Wanda on the dense MLP (`importance=\"wanda\"`, 95% of every output row, the training images as "
        f"calibration data; test accuracy {wanda.before:.2f}% before and {wanda.after:.2f}% after the same "
        f"fine-tuning as one-shot magnitude): "
        + pixels_text(pixel_statistics(wanda.model[0], mean_image)),
    ])
    quick_note = "\n*Quick run (--quick): short training, numbers are not representative.*\n" if result.quick else ""
    (mlp_epochs, mlp_budget), (cnn_epochs, cnn_budget) = result.epochs["mlp"], result.epochs["cnn"]
    return REPORT.format(
        seed=result.seed, mlp_epochs=mlp_epochs, cnn_epochs=cnn_epochs, mlp_budget=mlp_budget, cnn_budget=cnn_budget,
        lr=LR, quick_note=quick_note, targets=targets_text(mlp), pixels=pixels, elapsed=elapsed, **texts,
        **{key: os.path.basename(path) for key, path in plots.items()})


def results_json(result: DemoResult, elapsed: float) -> Dict:
    """What results.json holds: the settings and every test accuracy (sparsities as strings)."""
    results = {
        "seed": result.seed, "quick": result.quick, "seconds": elapsed, "threads": torch.get_num_threads(),
        **{kind: {"dense": sweep.dense, **{m: {str(k): v for k, v in sweep.accuracy[m].items()} for m in METHODS}}
           for kind, sweep in (("mlp", result.mlp), ("cnn", result.cnn))},
    }
    results["mlp"]["wanda one-shot 95% per row"] = result.wanda.before
    results["mlp"]["wanda one-shot 95% per row + fine-tune"] = result.wanda.after
    results["cnn"]["channels 50%"] = {k: v for k, v in result.channels.items() if k != "models"}
    results["mlp"]["adaptive"] = {k: v for k, v in result.adaptive.items() if k != "auto"}
    results["mlp"]["rigl"] = result.rigl
    results["auto"] = result.adaptive["auto"]  # its plan follows this machine's timings: not deterministic
    return results


def curves(sweep: Sweep) -> Dict[str, Dict[float, float]]:
    """{legend label: {sparsity: accuracy}} for the accuracy-vs-sparsity plot."""
    return {"one-shot, no fine-tuning": sweep.accuracy["one-shot"],
            "one-shot + fine-tune": sweep.accuracy["one-shot + fine-tune"],
            "progressive (cubic)": sweep.accuracy["progressive"]}


def accuracy_table(result: DemoResult) -> str:
    """The Markdown table of accuracy, sparsity, parameters and MACs for every model of both sweeps."""
    rows = (accuracy_rows("mlp", result.mlp, result.flat[2][:1])
            + accuracy_rows("cnn", result.cnn, result.images[2][:1]))
    return report.markdown_table(
        ["Model", "Method", "Sparsity", "Test acc. (%)", "Before fine-tune (%)", "Params", "Nonzeros",
         "MACs (dense)", "MACs (effective)"], rows, "lllrrrrrr")


def accuracy_rows(kind: str, sweep: Sweep, example: torch.Tensor) -> list:
    """The table's rows of one architecture: dense, then both methods at each sparsity."""
    dense_summary = summary(sweep.models["dense"], example_inputs=example).totals
    rows = [[kind.upper(), "dense", "0%", f"{sweep.dense:.2f}", "-", dense_summary["params"],
             dense_summary["nonzeros"], dense_summary["macs_dense"], dense_summary["macs_effective"]]]
    for target in sorted(sweep.accuracy["progressive"]):
        for method in ("one-shot + fine-tune", "progressive"):
            model = sweep.models[(method, target)]
            totals = summary(model, example_inputs=example).totals
            before = f"{sweep.accuracy['one-shot'][target]:.2f}" if method != "progressive" else "-"
            rows.append([kind.upper(), method, f"{100 * model_sparsity(model):.1f}%",
                         f"{sweep.accuracy[method][target]:.2f}", before, totals["params"], totals["nonzeros"],
                         totals["macs_dense"], totals["macs_effective"]])
    return rows


def targets_text(mlp: Sweep) -> str:
    """The MLP's two targets (90% within a point of dense; 95% progressive >= 10 points over one-shot)."""
    dense, progressive, oneshot = mlp.dense, mlp.accuracy["progressive"], mlp.accuracy["one-shot"]
    lines = []
    if 0.9 in progressive:
        gap = dense - progressive[0.9]
        verdict = "met" if gap <= 1.0 else "missed"
        lines.append(f"- MLP at 90% (progressive) within 1.0 point of dense: {progressive[0.9]:.2f}% vs "
                     f"{dense:.2f}% dense, a drop of {gap:.2f} points: **{verdict}**.")
    if 0.95 in progressive:
        lead = progressive[0.95] - oneshot[0.95]
        verdict = "met" if lead >= 10 else "missed"
        lines.append(f"- MLP at 95%: progressive {progressive[0.95]:.2f}% vs one-shot magnitude without "
                     f"fine-tuning {oneshot[0.95]:.2f}%, {lead:.2f} points ahead (target >= 10): **{verdict}**.")
    return "\n".join(lines)


def pixel_statistics(first_layer: nn.Linear, mean_image: torch.Tensor, blank: float = 0.05) -> Dict[str, float]:
    """Kept first-layer weights per input pixel, split by whether the pixel is nearly blank on
    average (mean intensity below ``blank``): what the pruned model stopped reading."""
    kept = (effective_weight(first_layer) != 0).sum(0).double()
    is_blank = mean_image < blank
    return {"ignored": int((kept == 0).sum()), "pixels": kept.numel(), "blank": int(is_blank.sum()),
            "kept_blank": float(kept[is_blank].mean()) if is_blank.any() else float("nan"),
            "kept_other": float(kept[~is_blank].mean()) if (~is_blank).any() else float("nan"),
            "ignored_blank": int(((kept == 0) & is_blank).sum())}


def pixels_text(stats: Dict[str, float]) -> str:
    """One sentence on `pixel_statistics`."""
    return (f"{stats['ignored']} of {stats['pixels']} pixels keep no weight at all "
            f"({stats['ignored_blank']} of them nearly blank on average, mean intensity < 0.05). The "
            f"{stats['blank']} nearly blank pixels keep {stats['kept_blank']:.1f} weights on average, the other "
            f"pixels {stats['kept_other']:.1f}.")
