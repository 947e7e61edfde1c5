"""Is a pruned convolution faster on the sparse kernel? torchprune vs dense F.conv2d (oneDNN).

One question: at the 3x3 and 1x1 shapes of ResNet stages (CIFAR's 32x32 stage and ImageNet's
56/28/14/7 stages; stride 1, 'same' padding), batch 1 and 8, fp32 on the CPU, how fast is
``torch.ops.torchprune.sparse_conv2d`` on ``pack_csr(W.reshape(O, -1))`` against the dense
``F.conv2d`` (oneDNN) of the same zero-filled weight? Both run in one interleaved loop; medians
of ``--repeats`` calls. Weights have exactly ``round(s * numel)`` zeros at random positions.
Prints the machine and a table, writes JSON and a PNG (speedup against sparsity per batch, with
the ideal 1/(1-s) line).

With ``--device cuda`` the same grid runs on the GPU in fp32 (TF32 off) and fp16: dense F.conv2d
(cuDNN) against ``sparse_conv2d`` on the packed weight moved to the GPU, timed with CUDA events,
interleaved, medians; output in bench_conv_cuda[_quick].json / .png. (torch has no CSR or 2:4
convolution to compare with; a 2:4 1x1 conv is a 2:4 linear layer, see bench_linear.)

    python benchmarks/bench_conv.py [--quick] [--repeats 10] [--threads 2] [--out benchmarks/results]
                                    [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchprune import ops as _ops  # noqa: E402

from _common import (  # noqa: E402
    break_even,
    describe,
    describe_gpu,
    gpu_info,
    machine_info,
    parse_args,
    pyplot,
    random_mask,
    save_figure,
    speedup_axis,
    time_cuda,
    time_interleaved,
    write_json,
)

# (kernel, in_channels, out_channels, height = width)
CASES = [
    (3, 64, 64, 32),     # CIFAR ResNet stage 1
    (3, 64, 64, 56),     # ResNet-18/34 stage 1
    (3, 128, 128, 28),   # stage 2
    (3, 256, 256, 14),   # stage 3
    (3, 512, 512, 7),    # stage 4
    (1, 256, 64, 56),    # ResNet-50 bottleneck reduce, stage 1
    (1, 64, 256, 56),    # bottleneck expand, stage 1
    (1, 512, 128, 28),   # reduce, stage 2
    (1, 1024, 256, 14),  # reduce, stage 3
]
BATCHES = [1, 8]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
QUICK = dict(cases=[(3, 64, 64, 32), (1, 256, 64, 16)], batches=[8], sparsities=[0.9])


def label(case) -> str:
    k, cin, cout, hw = case
    return f"{k}x{k} {cin}->{cout} {hw}x{hw}"


GPU = "cuda"  # a module constant so that tests can run the --device cuda path on the CPU
CUDA_DTYPES = (torch.float32, torch.float16)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-3), torch.float16: dict(rtol=1e-2, atol=5e-2)}


def make_runners(case, batch, sparsity, seed=0, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    k, cin, cout, hw = case
    weight = torch.randn(cout, cin, k, k, generator=generator)
    weight[~random_mask(weight.shape, sparsity, generator)] = 0.0
    x = torch.randn(batch, cin, hw, hw, generator=generator)
    pad = k // 2
    row_ptr, col_idx, values = _ops.pack_csr(weight.reshape(cout, -1))
    if device != "cpu" or dtype != torch.float32:  # packed on the CPU, then moved
        weight, x = weight.to(device, dtype), x.to(device, dtype)
        row_ptr, col_idx, values = row_ptr.to(device), col_idx.to(device), values.to(device, dtype)
    runners = {
        "F.conv2d": lambda: F.conv2d(x, weight, padding=pad),
        "torchprune": lambda: _ops.sparse_conv2d(x, row_ptr, col_idx, values, k, padding=pad),
    }

    def check():
        reference = F.conv2d(x.double(), weight.double(), padding=pad).to(dtype)
        for name, run in runners.items():
            torch.testing.assert_close(run(), reference, **TOL[dtype], msg=f"{name} disagrees")

    return runners, check


def main(argv=None) -> None:
    args = parse_args(__doc__.split("\n")[0], "two small cases, batch 8, 90%% only", argv, default_repeats=10)
    grid = QUICK if args.quick else dict(cases=CASES, batches=BATCHES, sparsities=SPARSITIES)
    if args.device == "cuda":
        return main_cuda(args, grid)
    info = machine_info()
    print(f"machine: {describe(info)}; fp32, stride 1, 'same' padding")
    print(f"medians of {args.repeats} interleaved repeats; speedup = dense time / torchprune time\n")
    header = f"{'conv':<22} {'batch':>5} {'sparsity':>8} {'F.conv2d ms':>11} {'tp ms':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for case in grid["cases"]:
        for batch in grid["batches"]:
            for sparsity in grid["sparsities"]:
                runners, check = make_runners(case, batch, sparsity)
                check()
                med = time_interleaved(runners, args.repeats)
                k, cin, cout, hw = case
                row = {"case": label(case), "kernel": k, "in_channels": cin, "out_channels": cout,
                       "size": hw, "batch": batch, "sparsity": sparsity,
                       **{f"{name} ms": t * 1e3 for name, t in med.items()},
                       "speedup": med["F.conv2d"] / med["torchprune"]}
                results.append(row)
                print(f"{row['case']:<22} {batch:>5} {sparsity:>8.2f} {row['F.conv2d ms']:>11.3f} "
                      f"{row['torchprune ms']:>9.3f} {row['speedup']:>7.2f}x")
    even = {}
    for k in sorted({r["kernel"] for r in results}):
        even[f"{k}x{k}"] = break_even([r for r in results if r["kernel"] == k], "batch", "speedup")
        print(f"break-even sparsity {k}x{k} (faster in every case from there up): "
              + ", ".join(f"batch {b}: {s if s is not None else 'never'}" for b, s in even[f"{k}x{k}"].items()))
    name = "bench_conv_quick" if args.quick else "bench_conv"
    write_json(os.path.join(args.out, name + ".json"),
               {"machine": info, "dtype": "float32", "repeats": args.repeats, "results": results, "break_even": even})
    plot(results, os.path.join(args.out, name + ".png"), info)
    print(f"\nwrote {args.out}/{name}.json and {name}.png")


def plot(results, path, info, describe=describe, dense="oneDNN") -> None:
    plt = pyplot()
    if plt is None:
        return
    batches = sorted({r["batch"] for r in results})
    cases = list(dict.fromkeys(r["case"] for r in results))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    sparsities = np.linspace(min(r["sparsity"] for r in results), max(r["sparsity"] for r in results), 50)
    for ax, batch in zip(axes[0], batches):
        for i, case in enumerate(cases):
            rows = sorted((r for r in results if r["batch"] == batch and r["case"] == case),
                          key=lambda r: r["sparsity"])
            style = "o-" if rows and rows[0]["kernel"] == 3 else "s--"
            ax.plot([r["sparsity"] for r in rows], [r["speedup"] for r in rows], style,
                    color=f"C{i % 10}", label=case)
        speedup_axis(ax, sparsities, batch, f"speedup over F.conv2d ({dense})")
    title = "Sparse conv2d, fp32" if dense == "oneDNN" else "Sparse conv2d on the GPU"
    save_figure(plt, fig, f"{title} - {describe(info)}", path)


def main_cuda(args, grid) -> None:
    """The same grid on the GPU, fp32 and fp16; rows carry the dtype in their case label."""
    info = gpu_info()
    print(f"machine: {describe_gpu(info)}; stride 1, 'same' padding")
    print(f"medians of {args.repeats} interleaved repeats (CUDA events); speedup = cuDNN time / torchprune time\n")
    header = f"{'conv':<30} {'batch':>5} {'sparsity':>8} {'cuDNN ms':>9} {'tp ms':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for dtype in CUDA_DTYPES:
        for case in grid["cases"]:
            for batch in grid["batches"]:
                for sparsity in grid["sparsities"]:
                    runners, check = make_runners(case, batch, sparsity, device=GPU, dtype=dtype)
                    check()
                    med = time_cuda(runners, args.repeats)
                    k, cin, cout, hw = case
                    row = {"case": f"{label(case)} {str(dtype)[6:]}", "kernel": k, "in_channels": cin,
                           "out_channels": cout, "size": hw, "batch": batch, "sparsity": sparsity,
                           "dtype": str(dtype)[6:], **{f"{name} ms": t * 1e3 for name, t in med.items()},
                           "speedup": med["F.conv2d"] / med["torchprune"]}
                    results.append(row)
                    print(f"{row['case']:<30} {batch:>5} {sparsity:>8.2f} {row['F.conv2d ms']:>9.3f} "
                          f"{row['torchprune ms']:>9.3f} {row['speedup']:>7.2f}x")
    even = {}
    for dtype in CUDA_DTYPES:
        for k in sorted({r["kernel"] for r in results}):
            key = f"{k}x{k} {str(dtype)[6:]}"
            even[key] = break_even([r for r in results if r["kernel"] == k and r["dtype"] == str(dtype)[6:]],
                                   "batch", "speedup")
            print(f"break-even sparsity {key}: "
                  + ", ".join(f"batch {b}: {s if s is not None else 'never'}" for b, s in even[key].items()))
    name = "bench_conv_cuda_quick" if args.quick else "bench_conv_cuda"
    write_json(os.path.join(args.out, name + ".json"),
               {"machine": info, "dtypes": [str(d)[6:] for d in CUDA_DTYPES], "repeats": args.repeats,
                "results": results, "break_even": even})
    plot(results, os.path.join(args.out, name + ".png"), info, describe_gpu, "cuDNN")
    print(f"\nwrote {args.out}/{name}.json and {name}.png")


if __name__ == "__main__":
    main()
