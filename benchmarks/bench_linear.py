"""Is a pruned linear layer faster on the sparse kernel? torchprune vs dense vs torch CSR.

One question: for real layer shapes, sparsities and batch sizes, how does ``y = x @ W.T`` with a
sparse ``W`` compare, fp32 on the CPU, when run by

* F.linear:    torch's dense product (MKL SGEMM);
* numpy:       numpy's dense product (OpenBLAS: GEMV ``W @ x`` at batch 1, GEMM ``x @ W.T`` above).
               On AMD CPUs MKL's small-batch path is weak (ours: 13-19 GB/s at batch 1 where OpenBLAS
               streams 80 GB/s), so a speedup over F.linear alone would flatter the sparse kernel;
* torch CSR:   ``torch.addmm(bias, W_csr, x.T)`` (MKL sparse BLAS), the bar to clear;
* torchprune:  ``torch.ops.torchprune.sparse_linear`` on ``pack_csr(W)``.

The torch candidates of a case run in one interleaved loop (round-robin, so drift hits all alike);
numpy runs in its own loop just before (its thread pool and torch's fight over the cores when
interleaved call by call); medians of ``--repeats`` calls. Weights are random with exactly ``round(s * N * K)`` zeros at random
positions. Weights stay in cache between calls when they fit (the small shapes), as in repeated
inference; 4096x4096 fp32 (64 MiB dense) does not fit, its sparse form at 90% (9.6 MiB) does.
Prints the machine and a table, writes JSON and a PNG (speedup over the best dense product
against sparsity, one panel per batch, with the ideal 1/(1-s) line and, at batch 1, the memory
bound 4/(6(1-s)) of CSR with int16 column indices).

    python benchmarks/bench_linear.py [--quick] [--repeats 15] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (break_even, describe, machine_info, pyplot, random_mask,  # noqa: E402
                     parse_args, save_figure, speedup_axis, time_interleaved, write_json)

from torchprune import _ops  # noqa: E402

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]  # (out_features, in_features)
BATCHES = [1, 8, 64, 256]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
QUICK = dict(shapes=[(768, 768)], batches=[1, 64], sparsities=[0.9])
CANDIDATES = ("F.linear", "numpy", "torch CSR", "torchprune")


def make_runners(shape, batch, sparsity, seed=0):
    """The four ways of computing the same product, each a no-argument closure, and a checker."""
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    weight = torch.randn(shape, generator=generator)
    weight[~random_mask(shape, sparsity, generator)] = 0.0
    x = torch.randn(batch, in_features, generator=generator)
    bias_column = torch.zeros(out_features, 1)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore")
        weight_csr = weight.to_sparse_csr()
    row_ptr, col_idx, values = _ops.pack_csr(weight)
    weight_np, x_np = weight.numpy(), x.numpy()
    x_vector = np.ascontiguousarray(x_np[0])
    runners = {
        "F.linear": lambda: F.linear(x, weight),
        "numpy": (lambda: weight_np @ x_vector) if batch == 1 else (lambda: x_np @ weight_np.T),
        "torch CSR": lambda: torch.addmm(bias_column, weight_csr, x.t()).t(),
        "torchprune": lambda: _ops.sparse_linear(x, row_ptr, col_idx, values, in_features),
    }

    def check():
        reference = F.linear(x.double(), weight.double()).float()
        for name, run in runners.items():
            y = torch.as_tensor(run()).reshape(batch, out_features)
            torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-3, msg=f"{name} disagrees")

    return runners, check


def main(argv=None) -> None:
    args = parse_args(__doc__.split("\n")[0], "one shape, batches 1 and 64, 90%% only", argv, default_repeats=15)
    grid = QUICK if args.quick else dict(shapes=SHAPES, batches=BATCHES, sparsities=SPARSITIES)
    info = machine_info()
    print(f"machine: {describe(info)}; fp32")
    print(f"medians of {args.repeats} interleaved repeats; speedup = other time / torchprune time\n")
    header = (f"{'shape':>10} {'batch':>5} {'sparsity':>8} {'F.linear ms':>11} {'numpy ms':>9} "
              f"{'CSR ms':>9} {'tp ms':>9} {'vs F.linear':>11} {'vs numpy':>9} {'vs CSR':>7}")
    print(header)
    print("-" * len(header))
    results = []
    for shape in grid["shapes"]:
        for batch in grid["batches"]:
            for sparsity in grid["sparsities"]:
                runners, check = make_runners(shape, batch, sparsity)
                check()
                # numpy in its own loop: interleaved call by call, OpenBLAS's spinning workers and
                # torch's take turns holding the 2 cores for whole scheduler ticks (768x768 at
                # batch 1 measured numpy 3.4 ms and torch CSR 4.1 ms per call, against 0.02 and
                # 0.05 ms apart). The torch candidates stay interleaved with each other.
                med = time_interleaved({"numpy": runners.pop("numpy")}, args.repeats)
                med.update(time_interleaved(runners, args.repeats))
                row = {"out_features": shape[0], "in_features": shape[1], "batch": batch,
                       "sparsity": sparsity, **{f"{k} ms": v * 1e3 for k, v in med.items()}}
                tp = med["torchprune"]
                row["speedup vs F.linear"] = med["F.linear"] / tp
                row["speedup vs numpy"] = med["numpy"] / tp
                row["speedup vs best dense"] = min(med["F.linear"], med["numpy"]) / tp
                row["speedup vs torch CSR"] = med["torch CSR"] / tp
                row["torch CSR vs best dense"] = min(med["F.linear"], med["numpy"]) / med["torch CSR"]
                results.append(row)
                print(f"{shape[0]:>4}x{shape[1]:<5} {batch:>5} {sparsity:>8.2f} {row['F.linear ms']:>11.3f} "
                      f"{row['numpy ms']:>9.3f} {row['torch CSR ms']:>9.3f} {row['torchprune ms']:>9.3f} "
                      f"{row['speedup vs F.linear']:>10.2f}x {row['speedup vs numpy']:>8.2f}x "
                      f"{row['speedup vs torch CSR']:>6.2f}x")
    even = {f"vs {dense}": break_even(results, "batch", f"speedup vs {dense}") for dense in ("F.linear", "best dense")}
    for which, by_batch in even.items():
        print(f"break-even sparsity {which} (faster in every shape from there up): "
              + ", ".join(f"batch {b}: {s if s is not None else 'never'}" for b, s in by_batch.items()))
    name = "bench_linear_quick" if args.quick else "bench_linear"
    write_json(os.path.join(args.out, name + ".json"),
               {"machine": info, "dtype": "float32", "repeats": args.repeats, "results": results, "break_even": even})
    plot(results, os.path.join(args.out, name + ".png"), info)
    print(f"\nwrote {args.out}/{name}.json and {name}.png")


def plot(results, path, info) -> None:
    plt = pyplot()
    if plt is None:
        return
    batches = sorted({r["batch"] for r in results})
    shapes = sorted({(r["out_features"], r["in_features"]) for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False)
    sparsities = np.linspace(min(r["sparsity"] for r in results), max(r["sparsity"] for r in results), 50)
    for ax, batch in zip(axes[0], batches):
        for i, shape in enumerate(shapes):
            rows = sorted((r for r in results if r["batch"] == batch
                           and (r["out_features"], r["in_features"]) == shape), key=lambda r: r["sparsity"])
            xs = [r["sparsity"] for r in rows]
            color = f"C{i}"
            ax.plot(xs, [r["speedup vs best dense"] for r in rows], "o-", color=color,
                    label=f"torchprune {shape[0]}x{shape[1]}")
            ax.plot(xs, [r["torch CSR vs best dense"] for r in rows], "x:", color=color,
                    label=f"torch CSR {shape[0]}x{shape[1]}")
        if batch == 1:
            ax.plot(sparsities, 4 / (6 * (1 - sparsities)), "k--", linewidth=1,
                    label="memory bound, CSR int16: 4/(6(1-s))")
        speedup_axis(ax, sparsities, batch, "speedup over the best dense (F.linear or numpy)")
    save_figure(plt, fig, f"Sparse linear, fp32 - {describe(info)}", path)


if __name__ == "__main__":
    main()
