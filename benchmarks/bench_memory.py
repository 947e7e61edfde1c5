"""Question: how much memory does pruning take on top of the model itself?

Builds MLPs of a few sizes (fp32 weights) and a conv net, runs one `tp.prune` per fresh subprocess
(magnitude with scope "layer" and "global", and a structured channel prune of the conv net), and
measures the peak extra resident memory of the call: the peak RSS during the call (Linux:
/proc/self/clear_refs resets VmHWM just before; elsewhere ru_maxrss, which can only overstate)
minus the RSS just before it. tracemalloc cannot see torch's tensors, so RSS is what counts.
The target (issue 7): peak extra <= 2x the model's weight bytes.

    python benchmarks/bench_memory.py                   # 50, 200 and 400 MB models
    python benchmarks/bench_memory.py --sizes 50 --quick

Prints machine info and a table; writes bench_memory.json and .png (bench_memory_quick.* with
--quick) to --out, default benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import RESULTS, describe, machine_info  # noqa: E402

CASES = ("magnitude-layer", "magnitude-global", "channel-conv")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(case: str, megabytes: float):
    """A model with about ``megabytes`` MB of fp32 weights, built without temporaries."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if case == "channel-conv":  # 3x3 convs of width w: 9 w^2 weights each, 4 of them
        width = max(8, int(((megabytes * 1e6 / 4) / (4 * 9)) ** 0.5))
        model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                              *[m for _ in range(4) for m in (nn.Conv2d(width, width, 3, padding=1), nn.ReLU())],
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
        return model, (torch.randn(1, 3, 8, 8),)
    width = int(((megabytes * 1e6 / 4) / 4) ** 0.5)  # 4 square layers of width^2 weights
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    return model, (torch.randn(1, width),)


def child(case: str, megabytes: float) -> dict:
    """Runs in a fresh process: build, measure, prune, measure."""
    import torch

    import torchprune as tp

    def prune(model, inputs):
        if case == "magnitude-layer":
            tp.prune(model, sparsity=0.9)
        elif case == "magnitude-global":
            tp.prune(model, sparsity=0.9, scope="global")
        else:
            tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=inputs)

    torch.set_num_threads(1)
    # A first call on a tiny model loads code and caches once per process (lazy imports, the
    # tracer, the dispatcher): counted apart, as "once", not as memory held for the model.
    exact = _reset_peak()
    start_kb = _rss_kb("VmRSS")
    prune(*_build(case, 0.05))
    once_kb = _rss_kb("VmRSS") - start_kb
    model, inputs = _build(case, megabytes)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    exact = _reset_peak() and exact
    before_kb = _rss_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prune(model, inputs)
    peak_kb = _rss_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra = (peak_kb - before_kb) * 1024
    return {"case": case, "model_mb": weight_bytes / 1e6, "peak_extra_mb": extra / 1e6,
            "ratio": extra / weight_bytes, "first_call_mb": once_kb * 1024 / 1e6,
            "measure": "VmHWM after clear_refs" if exact else "ru_maxrss"}


def run(sizes: List[float]) -> List[Dict]:
    rows = []
    for size in sizes:
        for case in CASES:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, str(size)],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                raise RuntimeError(f"{case} at {size} MB failed:\n{out.stderr}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[50, 200, 400],
                        help="model sizes in MB of fp32 weights")
    parser.add_argument("--quick", action="store_true", help="only the smallest size")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG (default benchmarks/results)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "MB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]))))
        return
    sizes = sorted(args.sizes)[:1] if args.quick else args.sizes
    info = machine_info()
    info["threads"] = 1
    rows = run(sizes)
    print(f"machine: {describe(info)}; one fresh process per row; peak extra = peak RSS during tp.prune - RSS before")
    print(f"{'case':>17} {'model MB':>9} {'peak extra MB':>14} {'ratio':>6} {'first call MB':>14}  measured by")
    print("-" * 86)
    for r in rows:
        print(f"{r['case']:>17} {r['model_mb']:9.1f} {r['peak_extra_mb']:14.1f} {r['ratio']:6.2f} "
              f"{r['first_call_mb']:14.1f}  {r['measure']}")
    print("ratio = peak extra / model size (target <= 2); first call = RSS kept by a first tp.prune on a tiny "
          "model in the same process (code and caches loaded once), not counted in peak extra")
    stem = os.path.join(args.out, "bench_memory_quick" if args.quick else "bench_memory")
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for case in CASES:
            pts = [r for r in rows if r["case"] == case]
            ax.plot([r["model_mb"] for r in pts], [r["ratio"] for r in pts], "o-", label=case)
        ax.axhline(2.0, color="grey", linestyle="--", label="2x target")
        ax.set_xlabel("model weights (MB, fp32)")
        ax.set_ylabel("peak extra memory / model size")
        ax.set_title("tp.prune peak extra memory")
        ax.legend()
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
