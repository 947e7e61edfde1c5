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
interleaved call by call); medians of ``--repeats`` calls. Weights are random with exactly
``round(s * N * K)`` zeros at random positions. Weights stay in cache between calls when they fit
(the small shapes), as in repeated inference; 4096x4096 fp32 (64 MiB dense) does not fit, its
sparse form at 90% (9.6 MiB) does.
Prints the machine and a table, writes JSON and a PNG (speedup over the best dense product
against sparsity, one panel per batch, with the ideal 1/(1-s) line and, at batch 1, the memory
bound 4/(6(1-s)) of CSR with int16 column indices).

With ``--device cuda`` the same grid runs on the GPU, fp32 (TF32 off) and fp16, comparing

* dense:       F.linear (cuBLAS);
* torch CSR:   ``torch.addmm(bias, W_csr, x.T)`` (cuSPARSE);
* torchprune:  ``sparse_linear`` on the packed weight, moved to the GPU;
* 2:4:         F.linear on ``to_sparse_semi_structured`` of the weight pruned to 2:4 by magnitude
               (a different, 50%-sparse weight: its speedup is over the dense layer of that shape;
               fp16 only, 'n/a' where this torch or GPU lacks it).

timed with CUDA events after a synchronize, interleaved, medians (see _common.time_cuda); output
in bench_linear_cuda[_quick].json / .png. The 4096x4096 fp32 weight (64 MiB) does not fit an H100's
50 MiB L2; everything else does and stays there between calls, as in repeated inference.

    python benchmarks/bench_linear.py [--quick] [--repeats 15] [--threads 2] [--out benchmarks/results]
                                      [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchprune import ops as _ops  # noqa: E402

from _common import (  # noqa: E402
    break_even,
    describe,
    describe_gpu,
    fmt_ms,
    gpu_info,
    machine_info,
    parse_args,
    pyplot,
    random_mask,
    ratio,
    save_figure,
    semi_structured,
    speedup_axis,
    time_cuda,
    time_interleaved,
    write_json,
)

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
    if args.device == "cuda":
        return main_cuda(args, grid)
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


# ---------------------------------------------------------------------------------------------
# --device cuda

GPU = "cuda"  # a module constant so that tests can run this code path with the CPU standing in
CUDA_DTYPES = (torch.float32, torch.float16)
CUDA_CANDIDATES = ("dense", "torch CSR", "torchprune", "2:4")
CUDA_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-3), torch.float16: dict(rtol=1e-2, atol=5e-2)}


def make_cuda_runners(shape, batch, sparsity, dtype, seed=0):
    """The GPU candidates that work here, as closures, and {candidate: why not} for the others.
    Each candidate is run once and checked against a float64 reference before it is timed."""
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    weight = torch.randn(shape, generator=generator)
    weight[~random_mask(shape, sparsity, generator)] = 0.0
    x = torch.randn(batch, in_features, generator=generator)
    packed = _ops.pack_csr(weight)  # packed on the CPU, then moved
    w, xd = weight.to(GPU, dtype), x.to(GPU, dtype)
    reference = F.linear(xd.double(), w.double())

    def build_csr():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            csr = w.to_sparse_csr()
        bias_column = torch.zeros(out_features, 1, dtype=dtype, device=GPU)
        return lambda: torch.addmm(bias_column, csr, xd.t()).t()

    def build_ours():
        row_ptr, col_idx, values = (t.to(GPU) for t in packed)
        values = values.to(dtype)
        return lambda: _ops.sparse_linear(xd, row_ptr, col_idx, values, in_features)

    builders = {"dense": lambda: (lambda: F.linear(xd, w)), "torch CSR": build_csr, "torchprune": build_ours}
    runners, missing = {}, {}
    for name, build in builders.items():
        try:
            run = build()
            torch.testing.assert_close(run().double(), reference, **CUDA_TOL[dtype])
            runners[name] = run
        except Exception as error:  # not supported here, or wrong: reported, not timed
            missing[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    sparse24, dense24 = semi_structured(w)
    if sparse24 is None:
        missing["2:4"] = dense24
    else:
        try:
            run = lambda: F.linear(xd, sparse24)  # noqa: E731
            torch.testing.assert_close(run().double(), F.linear(xd.double(), dense24.double()), **CUDA_TOL[dtype])
            runners["2:4"] = run
        except Exception as error:
            missing["2:4"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return runners, missing


def main_cuda(args, grid) -> None:
    info = gpu_info()
    print(f"machine: {describe_gpu(info)}; fp32 and fp16")
    print(f"medians of {args.repeats} interleaved repeats (CUDA events); speedup = other time / torchprune time;"
          " 2:4 = dense time / 2:4 time (its own 50% weight)\n")
    header = (f"{'shape':>10} {'batch':>5} {'dtype':>7} {'sparsity':>8} {'dense ms':>9} {'CSR ms':>8} "
              f"{'tp ms':>8} {'2:4 ms':>8} {'vs dense':>8} {'vs CSR':>7} {'2:4 vs dense':>12}")
    print(header)
    print("-" * len(header))
    results, notes = [], {}
    for dtype in CUDA_DTYPES:
        for shape in grid["shapes"]:
            for batch in grid["batches"]:
                for sparsity in grid["sparsities"]:
                    runners, missing = make_cuda_runners(shape, batch, sparsity, dtype)
                    for name, why in missing.items():
                        notes.setdefault(f"{name} {str(dtype)[6:]}", why)
                    med = {k: v * 1e3 for k, v in time_cuda(runners, args.repeats).items()}
                    row = {"out_features": shape[0], "in_features": shape[1], "batch": batch,
                           "dtype": str(dtype)[6:], "sparsity": sparsity,
                           **{f"{k} ms": med.get(k) for k in CUDA_CANDIDATES}, "n/a": missing}
                    row["speedup vs dense"] = ratio(med.get("dense"), med.get("torchprune"))
                    row["speedup vs torch CSR"] = ratio(med.get("torch CSR"), med.get("torchprune"))
                    row["torch CSR vs dense"] = ratio(med.get("dense"), med.get("torch CSR"))
                    row["2:4 vs dense"] = ratio(med.get("dense"), med.get("2:4"))
                    results.append(row)
                    print(f"{shape[0]:>4}x{shape[1]:<5} {batch:>5} {row['dtype']:>7} {sparsity:>8.2f} "
                          f"{fmt_ms(row['dense ms']):>9} {fmt_ms(row['torch CSR ms']):>8} "
                          f"{fmt_ms(row['torchprune ms']):>8} {fmt_ms(row['2:4 ms']):>8} "
                          f"{fmt_ratio(row['speedup vs dense']):>8} {fmt_ratio(row['speedup vs torch CSR']):>7} "
                          f"{fmt_ratio(row['2:4 vs dense']):>12}")
    for what, why in notes.items():
        print(f"n/a: {what}: {why}")
    even = {}
    for dtype in sorted({r["dtype"] for r in results}):
        rows = [r for r in results if r["dtype"] == dtype and r["speedup vs dense"] is not None]
        even[dtype] = break_even(rows, "batch", "speedup vs dense") if rows else {}
        print(f"break-even sparsity vs dense, {dtype} (faster in every shape from there up): "
              + ", ".join(f"batch {b}: {s if s is not None else 'never'}" for b, s in even[dtype].items()))
    name = "bench_linear_cuda_quick" if args.quick else "bench_linear_cuda"
    write_json(os.path.join(args.out, name + ".json"),
               {"machine": info, "dtypes": [str(d)[6:] for d in CUDA_DTYPES], "repeats": args.repeats,
                "results": results, "break_even": even, "n/a": notes})
    plot_cuda(results, os.path.join(args.out, name + ".png"), info)
    print(f"\nwrote {args.out}/{name}.json and {name}.png")


def fmt_ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def plot_cuda(results, path, info) -> None:
    """One panel per (dtype, batch): torchprune and torch CSR over dense against sparsity, per
    shape; 2:4 over dense as a star at s = 0.5."""
    plt = pyplot()
    if plt is None:
        return
    dtypes = sorted({r["dtype"] for r in results})
    batches = sorted({r["batch"] for r in results})
    shapes = sorted({(r["out_features"], r["in_features"]) for r in results})
    fig, axes = plt.subplots(len(dtypes), len(batches), figsize=(5 * len(batches), 4.5 * len(dtypes)), squeeze=False)
    sparsities = np.linspace(min(0.5, min(r["sparsity"] for r in results)), max(r["sparsity"] for r in results), 50)
    for row_axes, dtype in zip(axes, dtypes):
        for ax, batch in zip(row_axes, batches):
            for i, shape in enumerate(shapes):
                rows = sorted((r for r in results if r["dtype"] == dtype and r["batch"] == batch
                               and (r["out_features"], r["in_features"]) == shape), key=lambda r: r["sparsity"])
                color, label = f"C{i}", f"{shape[0]}x{shape[1]}"
                for key, style, who in (("speedup vs dense", "o-", "torchprune"),
                                        ("torch CSR vs dense", "x:", "torch CSR")):
                    pts = [(r["sparsity"], r[key]) for r in rows if r[key] is not None]
                    if pts:
                        ax.plot(*zip(*pts), style, color=color, label=f"{who} {label}")
                twofour = [r["2:4 vs dense"] for r in rows if r["2:4 vs dense"] is not None]
                if twofour:
                    ax.plot([0.5], [float(np.median(twofour))], "*", color=color, markersize=10, label=f"2:4 {label}")
            speedup_axis(ax, sparsities, batch, f"speedup over dense cuBLAS, {dtype}")
    save_figure(plt, fig, f"Sparse linear on the GPU - {describe_gpu(info)}", path)


if __name__ == "__main__":
    main()
