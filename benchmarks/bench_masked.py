"""What does training through a mask cost? masked ops vs dense layers vs multiplying by the mask.

A masked layer computes with where(mask, weight, 0), so it can never be faster than the dense layer:
this benchmark answers how much slower it is. Three ways of running the same layer are timed in
one interleaved loop (round-robin, so drift hits all alike), forward alone and forward+backward:

* dense:     F.linear / F.conv2d with the plain weight (no pruning at all, the floor);
* mul-mask:  F.linear(x, weight * mask) with a float mask (what a parametrization or hook does);
* torchprune: torch.ops.torchprune.masked_linear / masked_conv2d with a bool mask.

Prints machine info and a table of medians and ratios, and writes JSON and a PNG.

With ``--device cuda`` the same cases run on the GPU (the masked ops' CUDA kernels: our mask kernel
then cuBLAS / cuDNN), in fp32 (TF32 off) and fp16, timed with CUDA events; output in
bench_masked_cuda.json / .png.

    python benchmarks/bench_masked.py [--repeats 30] [--out benchmarks/results] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchprune import ops as _ops  # noqa: E402

from _common import add_device_argument, describe_gpu, gpu_info, machine_info, require_cuda, time_cuda, time_interleaved  # noqa: E402

LINEAR_SHAPES = [(768, 768), (3072, 768), (4096, 4096)]  # (out_features, in_features)
LINEAR_BATCHES = [1, 64, 256]
CONV_CASES = [(8, 64, 64, 32, 3), (8, 256, 256, 8, 3), (8, 256, 64, 16, 1)]  # N, Cin, Cout, HW, k
SPARSITY = 0.9


def make_runners(kind: str, case: tuple, backward: bool, device: str = "cpu", dtype=torch.float32):
    """Three closures that run the same layer three ways; each returns nothing."""
    gen = torch.Generator().manual_seed(0)
    if kind == "linear":
        (out_f, in_f), batch = case
        x = torch.randn(batch, in_f, generator=gen)
        weight = torch.randn(out_f, in_f, generator=gen)
        dense = lambda x, w, m: F.linear(x, w)  # noqa: E731
        mul = lambda x, w, m: F.linear(x, w * m)  # noqa: E731
        ours = lambda x, w, m: _ops.masked_linear(x, w, m)  # noqa: E731
    else:
        n, cin, cout, hw, k = case
        x = torch.randn(n, cin, hw, hw, generator=gen)
        weight = torch.randn(cout, cin, k, k, generator=gen)
        pad = k // 2
        dense = lambda x, w, m: F.conv2d(x, w, padding=pad)  # noqa: E731
        mul = lambda x, w, m: F.conv2d(x, w * m, padding=pad)  # noqa: E731
        ours = lambda x, w, m: _ops.masked_conv2d(x, w, m, padding=pad)  # noqa: E731
    mask = torch.rand(weight.shape, generator=gen) >= SPARSITY
    if device != "cpu" or dtype != torch.float32:
        x, weight, mask = x.to(device, dtype), weight.to(device, dtype), mask.to(device)
    weight.requires_grad_(backward)
    float_mask = mask.to(weight.dtype)

    def wrap(fn, m):
        def run():
            if backward:
                fn(x, weight, m).sum().backward()
                weight.grad = None
            else:
                with torch.no_grad():
                    fn(x, weight, m)
        return run

    return {"dense": wrap(dense, None), "mul-mask": wrap(mul, float_mask), "torchprune": wrap(ours, mask)}


def cases():
    for shape in LINEAR_SHAPES:
        for batch in LINEAR_BATCHES:
            yield "linear", (shape, batch), f"linear {shape[0]}x{shape[1]} batch {batch}"
    for case in CONV_CASES:
        n, cin, cout, hw, k = case
        yield "conv", case, f"conv {k}x{k} {cin}->{cout} {hw}x{hw} batch {n}"


GPU = "cuda"  # a module constant so that tests can run the --device cuda path on the CPU


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.device == "cuda":
        require_cuda(parser)
        info, device, dtypes, timer, name = (gpu_info(), GPU, (torch.float32, torch.float16), time_cuda,
                                             "bench_masked_cuda")
        print(f"machine: {describe_gpu(info)}; fp32 and fp16, sparsity {SPARSITY}")
    else:
        info, device, dtypes, timer, name = machine_info(), "cpu", (torch.float32,), time_interleaved, "bench_masked"
        print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}; fp32, sparsity {SPARSITY}")
    print(f"medians of {args.repeats} interleaved repeats; ratio = time / dense time (lower is better)\n")
    header = (f"{'case':<44} {'pass':<8} {'dense ms':>9} {'mul-mask ms':>12} {'torchprune ms':>14}"
              f" {'mul/dense':>10} {'tp/dense':>9}")
    print(header)
    print("-" * len(header))
    results = []
    for dtype, (kind, case, label) in ((d, c) for d in dtypes for c in cases()):
        if len(dtypes) > 1:
            label = f"{label} {str(dtype)[6:]}"
        for backward in (False, True):
            med = timer(make_runners(kind, case, backward, device, dtype), args.repeats, warmup=3)
            row = {"case": label, "pass": "fwd+bwd" if backward else "fwd", **{k: v * 1e3 for k, v in med.items()}}
            row["mul/dense"] = med["mul-mask"] / med["dense"]
            row["tp/dense"] = med["torchprune"] / med["dense"]
            results.append(row)
            print(f"{label:<44} {row['pass']:<8} {row['dense']:>9.3f} {row['mul-mask']:>12.3f} "
                  f"{row['torchprune']:>14.3f} {row['mul/dense']:>10.2f} {row['tp/dense']:>9.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"machine": info, "sparsity": SPARSITY, "repeats": args.repeats, "results": results}, f, indent=1)
    plot(results, os.path.join(args.out, name + ".png"), info)
    print(f"\nwrote {args.out}/{name}.json and {name}.png")


def plot(results, path, info) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, max(6, 0.3 * len(results))), sharey=True)
    for ax, which in zip(axes, ("fwd", "fwd+bwd")):
        rows = [r for r in results if r["pass"] == which]
        ys = range(len(rows))
        ax.barh([y - 0.2 for y in ys], [r["mul/dense"] for r in rows], height=0.4, label="weight * mask")
        ax.barh([y + 0.2 for y in ys], [r["tp/dense"] for r in rows], height=0.4, label="torchprune masked op")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(list(ys), [r["case"] for r in rows])
        ax.set_xlabel("time relative to the dense layer (1.0 = no overhead)")
        ax.set_title(which)
        ax.legend(loc="lower right")
    where = (describe_gpu(info) if "gpu" in info
             else f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}")
    fig.suptitle(f"Cost of masking at {SPARSITY:.0%} sparsity - {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
