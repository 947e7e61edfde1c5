"""The demo: pruning two small models trained on real handwritten digits, written up as a report.

``python -m torchprune demo [--out DIR] [--quick] [--seed N]`` trains an MLP (64-300-100-10, the
LeNet-300-100 shape) and a small CNN on scikit-learn's 1,797 8x8 digits, then compares at 50, 80,
90 and 95% global sparsity:

* one-shot magnitude pruning of the trained model, before and after fine-tuning, and
* progressive magnitude pruning with the Zhu & Gupta cubic schedule (`tp.Pruner`), given the same
  number of training epochs as the fine-tuning;

and prunes the dense MLP once with Wanda to 95% to contrast which input pixels each keeps reading.
On the MLP it also runs the adaptive schedule (`tp.schedules.Adaptive`, driven by validation
accuracy) against a fixed one, and regrowth (``regrow=``, RigL) against prune-only at 95% over
three seeds (`adaptive`).
The CNN also loses half of its channels (filters and neurons, removed physically by
``tp.prune(granularity="channel")`` then fine-tuned, and progressively by the channel Pruner), which
makes it smaller and faster with dense kernels.

It writes DIR/report.md (accuracy, parameters, nonzeros, MACs, latency) with PNG plots beside it,
and DIR/results.json. Deterministic for a given ``--seed`` (single-threaded by default), but for the
latencies and the `tp.auto` comparison, whose plan follows this machine's timings.

The parts: `digits` (the data), `common` (settings, models, training, result records), `weights` (the
weight-level runs), `channels` (the channel-level runs), `adaptive` (the adaptive runs), `writeup`
(plots, report.md, results.json); this module runs them in order and holds the command line's arguments.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Dict, Optional

import torch

from . import adaptive, channels, digits, weights, writeup
from .common import FULL, QUICK, SPARSITIES, DemoResult, progress_bar

__all__ = ["run", "add_arguments"]


def run(out: str = "torchprune-demo", quick: bool = False, seed: int = 0, threads: Optional[int] = 1) -> Dict:
    """Runs the demo, writes ``out``/report.md, PNGs and results.json; returns the results.

    ``threads`` sets torch's intra-op threads for the run (restored afterwards): these models are so
    small that one thread is fastest and the timing is steadier; None leaves torch's setting.
    """
    os.makedirs(out, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        result = train_and_prune(quick, seed)
        print_accuracies(result)
        return writeup.write(out, result, start)
    finally:
        torch.set_num_threads(previous_threads)


def train_and_prune(quick: bool, seed: int) -> DemoResult:
    """Every training run of the demo, in a fixed order (the seeds and the results depend on it)."""
    epochs = QUICK if quick else FULL
    flat = digits.load_digits(seed=seed)
    images = digits.load_digits(seed=seed, flatten=False)
    print(f"digits: {len(flat[0])} training and {len(flat[2])} test images (8x8, scikit-learn's bundled set)")
    jobs = 2 * (1 + 2 * len(SPARSITIES)) + 2
    with progress_bar(range(jobs), "demo", leave=True) as bar:
        mlp = weights.sweep("mlp", flat, epochs["mlp"], seed, SPARSITIES, bar)
        cnn = weights.sweep("cnn", images, epochs["cnn"], seed, SPARSITIES, bar)
        channel_result = channels.run(images, epochs["cnn"][1], seed, cnn.models["dense"], bar)
    wanda = weights.wanda(mlp.models["dense"], flat, epochs["mlp"][1], seed)
    fit_dense = adaptive.fit_dense(flat, epochs["mlp"][0], seed)
    found = adaptive.adaptive(fit_dense, flat, epochs["mlp"][1], seed)
    found["auto"] = adaptive.auto_vs_uniform(fit_dense, flat, epochs["mlp"][1], seed, repeats=20 if quick else 100)
    rigl = adaptive.rigl(flat, epochs["mlp"], seeds=tuple(seed + i for i in adaptive.RIGL_SEEDS))
    return DemoResult(seed=seed, quick=quick, epochs=epochs, flat=flat, images=images, mlp=mlp, cnn=cnn,
                      channels=channel_result, wanda=wanda, adaptive=found, rigl=rigl)


def print_accuracies(result: DemoResult) -> None:
    """The test accuracies, one line per sparsity, on stdout."""
    for kind, sweep in (("MLP", result.mlp), ("CNN", result.cnn)):
        print(f"{kind}: dense {sweep.dense:.2f}%")
        for target in SPARSITIES:
            print(f"  {target:.0%}: one-shot {sweep.accuracy['one-shot'][target]:.2f}%, one-shot + fine-tune "
                  f"{sweep.accuracy['one-shot + fine-tune'][target]:.2f}%, "
                  f"progressive {sweep.accuracy['progressive'][target]:.2f}%")
    found = result.channels
    print(f"CNN, 50% of channels removed: one-shot {found['one-shot']:.2f}%, one-shot + fine-tune "
          f"{found['one-shot + fine-tune']:.2f}%, progressive {found['progressive']:.2f}%")
    test = result.adaptive["test"]
    print(f"MLP, adaptive schedule: {100 * result.adaptive['sparsity']:.1f}% sparse, {test['adaptive']:.2f}% "
          f"(dense {test['dense']:.2f}%, fixed cubic to the same sparsity {test['fixed']:.2f}%)")
    auto = result.adaptive["auto"]
    print(f"MLP, tp.auto at {auto['budget']} of dense latency: measured {auto['rows']['auto']['latency']:.3f}, "
          f"{auto['rows']['auto']['test']:.2f}% (uniform at that latency: "
          + ("-" if auto["uniform at plan latency"] is None else f"{auto['uniform at plan latency']:.2f}%") + ")")
    mean = result.rigl["mean"]
    print(f"MLP at {result.rigl['target']:.0%}, mean of {len(result.rigl['rows'])} seeds: prune-only "
          f"{mean['prune-only']:.2f}%, RigL {mean['rigl']:.2f}%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line flags (``python -m torchprune demo``)."""
    parser.add_argument("--out", default="torchprune-demo",
                        help="directory for report.md and the plots (default torchprune-demo)")
    parser.add_argument("--quick", action="store_true", help="a few epochs only: checks that everything runs (seconds)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: data split, initialisation, batch order (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, fastest for these tiny models)")
