"""Does sparsify() make a 90%-pruned model faster end to end? dense vs masked vs sparsified.

One question: an MLP (1024-4096-4096-1024, ReLU) and a small Transformer encoder (4 pre-norm
blocks, d_model 512, 8 heads, feed-forward 2048, 32 tokens per sequence; every projection an
``nn.Linear``), each pruned to 90% (``tp.prune``, magnitude, per layer), fp32 on the CPU, inference
at batch 1 and 64. Three versions of each model run in one interleaved loop, medians:

* dense:      the pruned weights as plain ``nn.Linear`` (zeros included; ``tp.make_permanent``);
* masked:     what ``tp.prune`` leaves (the masked C++ op: no faster than dense, by design);
* sparsified: ``tp.sparsify(model, example_inputs=x)``: the layers whose sparse kernel measured
  faster at that input are swapped (the count is printed).

Outputs of the three are checked against each other first. Prints the machine and a table,
writes JSON and a PNG (latency per model and batch).

With ``--device cuda`` the three versions run on the GPU in fp32 (TF32 off) and fp16, timed with
CUDA events, interleaved, medians; the model is pruned and sparsified on the CPU (every pruned
layer swapped: ``min_sparsity=0``, since sparsify() times layers on the CPU) and then moved. Output
in bench_models_cuda[_quick].json / .png.

    python benchmarks/bench_models.py [--quick] [--repeats 10] [--threads 2] [--out benchmarks/results]
                                      [--device cpu|cuda]
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchprune as tp  # noqa: E402

from _common import (  # noqa: E402
    describe,
    describe_gpu,
    gpu_info,
    machine_info,
    parse_args,
    pyplot,
    save_figure,
    time_cuda,
    time_interleaved,
    write_json,
)

SPARSITY = 0.9
BATCHES = [1, 64]


def mlp(widths=(1024, 4096, 4096, 1024)) -> nn.Module:
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Block(nn.Module):
    """A pre-norm Transformer encoder block whose projections are all plain nn.Linear layers."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(batch, tokens, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + self.out(attention)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def transformer(width=512, heads=8, hidden=2048, depth=4) -> nn.Module:
    return nn.Sequential(*(Block(width, heads, hidden) for _ in range(depth)))


MODELS = {
    "MLP 1024-4096-4096-1024": (mlp, lambda batch: (batch, 1024)),
    "Transformer 4x512 (32 tokens)": (transformer, lambda batch: (batch, 32, 512)),
}
QUICK = {
    "MLP 256-1024-256": (lambda: mlp((256, 1024, 256)), lambda batch: (batch, 256)),
    "Transformer 2x128 (8 tokens)": (lambda: transformer(128, 4, 256, 2), lambda batch: (batch, 8, 128)),
}


def main(argv=None) -> None:
    args = parse_args(__doc__.split("\n")[0], "small models (for tests)", argv, default_repeats=10)
    models = QUICK if args.quick else MODELS
    if args.device == "cuda":
        return main_cuda(args, models)
    info = machine_info()
    print(f"machine: {describe(info)}; fp32, {SPARSITY:.0%} sparsity per layer")
    print(f"medians of {args.repeats} interleaved repeats; speedup = dense time / sparsified time\n")
    header = (f"{'model':<30} {'batch':>5} {'dense ms':>9} {'masked ms':>10} {'sparsified ms':>13} "
              f"{'swapped':>8} {'speedup':>8}")
    print(header)
    print("-" * len(header))
    results = []
    for name, (build, input_shape) in models.items():
        torch.manual_seed(0)
        masked = tp.prune(build().eval(), sparsity=SPARSITY)
        dense = tp.make_permanent(copy.deepcopy(masked))
        linears = sum(isinstance(m, nn.Linear) for m in dense.modules())
        for batch in BATCHES:
            x = torch.randn(input_shape(batch), generator=torch.Generator().manual_seed(1))
            sparse = tp.sparsify(masked, example_inputs=x)
            swapped = sum(isinstance(m, (tp.nn.SparseLinear, tp.nn.SparseConv2d)) for m in sparse.modules())
            with torch.inference_mode():
                reference = dense(x)
                for version in (masked, sparse):
                    torch.testing.assert_close(version(x), reference, rtol=1e-4, atol=1e-4)
                med = time_interleaved({"dense": lambda: dense(x), "masked": lambda: masked(x),
                                        "sparsified": lambda: sparse(x)}, args.repeats)
            row = {"model": name, "batch": batch, "swapped": swapped, "linear layers": linears,
                   **{f"{k} ms": v * 1e3 for k, v in med.items()},
                   "speedup": med["dense"] / med["sparsified"]}
            results.append(row)
            print(f"{name:<30} {batch:>5} {row['dense ms']:>9.3f} {row['masked ms']:>10.3f} "
                  f"{row['sparsified ms']:>13.3f} {f'{swapped}/{linears}':>8} {row['speedup']:>7.2f}x")
    out = "bench_models_quick" if args.quick else "bench_models"
    write_json(os.path.join(args.out, out + ".json"),
               {"machine": info, "dtype": "float32", "sparsity": SPARSITY, "repeats": args.repeats,
                "results": results})
    plot(results, os.path.join(args.out, out + ".png"), info)
    print(f"\nwrote {args.out}/{out}.json and {out}.png")


GPU = "cuda"  # a module constant so that tests can run the --device cuda path on the CPU
CUDA_DTYPES = (torch.float32, torch.float16)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


def main_cuda(args, models) -> None:
    info = gpu_info()
    print(f"machine: {describe_gpu(info)}; {SPARSITY:.0%} sparsity per layer")
    print(f"medians of {args.repeats} interleaved repeats (CUDA events); speedup = dense time / sparsified time\n")
    header = (f"{'model':<40} {'batch':>5} {'dense ms':>9} {'masked ms':>10} {'sparsified ms':>13} "
              f"{'swapped':>8} {'speedup':>8}")
    print(header)
    print("-" * len(header))
    results = []
    for dtype in CUDA_DTYPES:
        for name, (build, input_shape) in models.items():
            torch.manual_seed(0)
            masked = tp.prune(build().eval(), sparsity=SPARSITY)
            dense = tp.make_permanent(copy.deepcopy(masked))
            sparse = tp.sparsify(masked, min_sparsity=0.0)
            linears = sum(isinstance(m, nn.Linear) for m in dense.modules())
            swapped = sum(isinstance(m, (tp.nn.SparseLinear, tp.nn.SparseConv2d)) for m in sparse.modules())
            masked, dense, sparse = (m.to(GPU, dtype) for m in (masked, dense, sparse))
            label = f"{name} {str(dtype)[6:]}"
            for batch in BATCHES:
                x = torch.randn(input_shape(batch), generator=torch.Generator().manual_seed(1)).to(GPU, dtype)
                with torch.inference_mode():
                    reference = dense(x)
                    for version in (masked, sparse):
                        torch.testing.assert_close(version(x), reference, **TOL[dtype])
                    med = time_cuda({"dense": lambda: dense(x), "masked": lambda: masked(x),
                                     "sparsified": lambda: sparse(x)}, args.repeats)
                row = {"model": label, "batch": batch, "dtype": str(dtype)[6:], "swapped": swapped,
                       "linear layers": linears, **{f"{k} ms": v * 1e3 for k, v in med.items()},
                       "speedup": med["dense"] / med["sparsified"]}
                results.append(row)
                print(f"{label:<40} {batch:>5} {row['dense ms']:>9.3f} {row['masked ms']:>10.3f} "
                      f"{row['sparsified ms']:>13.3f} {f'{swapped}/{linears}':>8} {row['speedup']:>7.2f}x")
    out = "bench_models_cuda_quick" if args.quick else "bench_models_cuda"
    write_json(os.path.join(args.out, out + ".json"),
               {"machine": info, "dtypes": [str(d)[6:] for d in CUDA_DTYPES], "sparsity": SPARSITY,
                "repeats": args.repeats, "results": results})
    plot(results, os.path.join(args.out, out + ".png"), info, describe_gpu)
    print(f"\nwrote {args.out}/{out}.json and {out}.png")


def plot(results, path, info, describe=describe) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(9, max(4.5, 0.6 * len(results))))
    labels = [f"{r['model']}\nbatch {r['batch']}" for r in results]
    ys = range(len(results))
    for offset, key, color in ((-0.27, "dense ms", "C0"), (0.0, "masked ms", "C1"), (0.27, "sparsified ms", "C2")):
        ax.barh([y + offset for y in ys], [r[key] / r["dense ms"] for r in results], height=0.26,
                color=color, label=key.replace(" ms", ""))
    for y, r in zip(ys, results):
        ax.text(r["sparsified ms"] / r["dense ms"], y + 0.27, f"  dense / sparsified = {r['speedup']:.2f}",
                va="center", fontsize=7)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.set_xlabel("latency relative to dense (lower is better)")
    ax.legend(loc="lower right")
    save_figure(plt, fig, f"End to end at {SPARSITY:.0%} sparsity - {describe(info)}", path)


if __name__ == "__main__":
    main()
