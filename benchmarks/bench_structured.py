"""Question: how much smaller and faster does channel pruning make each zoo model, and how does that
compare with Torch-Pruning at the same ratio?

Each model of tests/zoo.py (built wider than in the tests, so latency means something) is pruned
at 30/50/70% channel sparsity with importance "l2" by `tp.prune(granularity="channel")` and, when
``torch_pruning`` is importable, by Torch-Pruning's MetaPruner (GroupMagnitudeImportance(p=2),
the final classifier ignored, MultiheadAttention heads left to its defaults). For each: params,
MACs (counted by the same hooks for every model: conv, linear, attention projections and
matmuls of nn.MultiheadAttention, LSTM), CPU latency at batch 1 and 32 (median of interleaved runs,
1 thread), and the wall time of the pruning call (tracing included for both libraries).

    python benchmarks/bench_structured.py [--quick] [--models vgg,mlp] [--ratios 0.5]
    python benchmarks/bench_structured.py --prune-time 20     # only the pruning calls, 20 each

Prints a table and writes results/bench_structured.json and results/bench_structured.png
(--prune-time: results/bench_structured_prune_time.json).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torchprune as tp  # noqa: E402
from torchprune.nn.attention import PrunedMultiheadAttention  # noqa: E402

import zoo  # noqa: E402
from _common import RESULTS, describe, machine_info, pyplot, set_threads, time_interleaved, write_json  # noqa: E402

try:
    import torch_pruning as tpp
except ImportError:  # the comparison is optional; never a dependency of torchprune
    tpp = None

MODELS = {
    "vgg": (lambda: zoo.VGG(widths=(64, 128, 128)), "image", "classifier.3"),
    "resnet_basic": (lambda: zoo.ResNet(zoo.BasicBlock, (32, 64), (2, 2)), "image", "fc"),
    "resnet_bottleneck": (lambda: zoo.ResNet(zoo.Bottleneck, (16, 32), (2, 2)), "image", "fc"),
    "mobilenetv2": (zoo.MobileNetV2, "image", "classifier"),
    "concat": (zoo.ConcatNet, "image", "fc"),
    "mlp": (lambda: zoo.MLP((256, 1024, 1024, 10)), "vector256", "fc3"),
    "vit": (lambda: zoo.ViT(dim=64, heads=4, hidden=256, depth=4), "image", "head"),
    "transformer": (lambda: zoo.TransformerEncoder(dim=64, heads=4, hidden=256, depth=4), "tokens", "head"),
    "lstm": (lambda: zoo.LSTMClassifier(emb=64, proj=128, hidden=128, mid=64), "tokens", "fc2"),
    "glu": (zoo.GLUNet, "image", "fc"),
    "dynamic": (zoo.DynamicNet, "image", "fc"),
}


def inputs(kind: str, batch: int):
    g = torch.Generator().manual_seed(batch)
    if kind == "image":
        return (torch.randn(batch, 3, 16, 16, generator=g),)
    if kind == "tokens":
        return (torch.randint(0, 50, (batch, 8), generator=g),)
    return (torch.randn(batch, 256, generator=g),)


def count_macs(model: nn.Module, example) -> int:
    """Multiply-accumulates per sample of conv, linear, attention and LSTM layers."""
    total = [0]
    batch = example[0].shape[0]

    def hook(m, args, out):
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            total[0] += out.numel() * m.in_channels // m.groups * int(torch.tensor(m.kernel_size).prod())
        elif isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features
        elif isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)):
            q, k = args[0], args[1]
            L, S = (q.shape[1], k.shape[1]) if m.batch_first else (q.shape[0], k.shape[0])
            inner = m.num_heads * m.head_dim
            total[0] += q.shape[0 if m.batch_first else 1] * (3 * L * m.embed_dim * inner + 2 * L * S * inner)
            if isinstance(m, nn.MultiheadAttention):  # its out_proj does not run as a module
                total[0] += q.numel() // m.embed_dim * inner * m.embed_dim
        elif isinstance(m, nn.LSTM):
            x = args[0]
            steps = x.numel() // x.shape[-1]
            total[0] += steps * 4 * m.hidden_size * (m.input_size + m.hidden_size)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()
    return total[0] // batch


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_ours(model, example, ratio):
    start = time.perf_counter()
    tp.prune(model, sparsity=ratio, granularity="channel", importance="l2", example_inputs=example)
    return time.perf_counter() - start


def prune_theirs(model, example, ratio, classifier):
    start = time.perf_counter()
    pruner = tpp.pruner.MetaPruner(
        model, example[0], importance=tpp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=[model.get_submodule(classifier)],
    )
    pruner.step()
    return time.perf_counter() - start


def latency(models: dict, kind: str, repeats: int) -> dict:
    out = {}
    for batch in (1, 32):
        x = inputs(kind, batch)
        with torch.no_grad():
            times = time_interleaved({k: (lambda m=m: m(*x)) for k, m in models.items()}, repeats=repeats)
        for k, t in times.items():
            out[(k, batch)] = t * 1e3
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and PNG from the last JSON")
    parser.add_argument("--prune-time", type=int, metavar="N", default=0,
                        help="only time the pruning calls: N interleaved calls per library and ratio (fresh copies; "
                             "the first call of each is a warm-up), median and min printed and saved")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the models")
    args = parser.parse_args()
    if args.prune_time:
        limiter = set_threads(1)  # noqa: F841  (kept alive)
        _prune_times(args.models.split(","), [float(r) for r in args.ratios.split(",")], args.prune_time)
        return
    if args.plot_only:
        import json

        with open(os.path.join(RESULTS, "bench_structured.json")) as f:
            rows = json.load(f)["results"]
        print(_table(rows))
        _plot(rows)
        return
    limiter = set_threads(1)  # noqa: F841  (kept alive)
    info = machine_info()
    repeats = 5 if args.quick else 15
    rows = []
    for name, (make, kind, classifier) in [(n, MODELS[n]) for n in args.models.split(",")]:
        torch.manual_seed(0)
        base = make().eval()
        zoo.randomize_norms(base)
        example = inputs(kind, 2)
        base_params, base_macs = params(base), count_macs(base, example)
        for ratio in [float(r) for r in args.ratios.split(",")]:
            row = {"model": name, "ratio": ratio, "params_base": base_params, "macs_base": base_macs}
            models = {"base": base}
            ours = copy.deepcopy(base)
            try:
                row["time_ours_s"] = prune_ours(ours, example, ratio)
                row["params_ours"], row["macs_ours"] = params(ours), count_macs(ours, example)
                models["ours"] = ours
            except Exception as error:  # report, do not hide
                row["ours_error"] = f"{type(error).__name__}: {error}"[:200]
            if tpp is not None:
                theirs = copy.deepcopy(base)
                try:
                    row["time_tp_s"] = prune_theirs(theirs, example, ratio, classifier)
                    with torch.no_grad():
                        theirs(*example)
                    row["params_tp"], row["macs_tp"] = params(theirs), count_macs(theirs, example)
                    models["tp"] = theirs
                except Exception as error:
                    row["tp_error"] = f"{type(error).__name__}: {error}"[:200]
            for (k, batch), ms in latency(models, kind, repeats).items():
                row[f"ms_{k}_b{batch}"] = ms
            rows.append(row)
            print(_line(row), flush=True)
    payload = {"machine": info, "torch_pruning": getattr(tpp, "__version__", None), "results": rows}
    write_json(os.path.join(RESULTS, "bench_structured.json"), payload)
    print(f"\n{describe(info)}; Torch-Pruning {payload['torch_pruning'] or 'not installed'}")
    print(_table(rows))
    _plot(rows)


def _prune_times(names, ratios, calls):
    """Wall time of the pruning call alone: ours and Torch-Pruning's, interleaved on fresh copies."""
    import statistics

    rows = []
    for name in names:
        make, kind, classifier = MODELS[name]
        torch.manual_seed(0)
        base = make().eval()
        zoo.randomize_norms(base)
        example = inputs(kind, 2)
        for ratio in ratios:
            times = {"ours": [], "tp": []}
            for _ in range(calls + 1):
                times["ours"].append(prune_ours(copy.deepcopy(base), example, ratio))
                if tpp is not None and times["tp"] is not None:
                    try:
                        times["tp"].append(prune_theirs(copy.deepcopy(base), example, ratio, classifier))
                    except Exception:  # the models Torch-Pruning fails on (see the main table)
                        times["tp"] = None
            row = {"model": name, "ratio": ratio}
            for k, v in times.items():
                if v:
                    row[f"{k}_median_ms"] = statistics.median(v[1:]) * 1e3
                    row[f"{k}_min_ms"] = min(v[1:]) * 1e3
            rows.append(row)
            tp_text = (f"{row['tp_median_ms']:7.1f} / {row['tp_min_ms']:7.1f}" if "tp_median_ms" in row
                       else "      fails      ")
            print(f"| {name} | {ratio:.1f} | {row['ours_median_ms']:7.1f} / {row['ours_min_ms']:7.1f} | {tp_text} |",
                  flush=True)
    info = machine_info()
    write_json(os.path.join(RESULTS, "bench_structured_prune_time.json"),
               {"machine": info, "torch_pruning": getattr(tpp, "__version__", None), "calls": calls, "results": rows})


def _fmt(v, kind=""):
    if v is None:
        return "-"
    if kind == "k":
        return f"{v / 1e3:.1f}k"
    if kind == "M":
        return f"{v / 1e6:.2f}M"
    return f"{v:.2f}"


def _line(r):
    return (f"{r['model']:<18} {r['ratio']:.1f}  params {r['params_base']}"
            f" -> ours {r.get('params_ours', r.get('ours_error'))}"
            f" / TP {r.get('params_tp', r.get('tp_error', '-'))}")


def _table(rows) -> str:
    head = ("| model | ratio | params base | ours | TP | MACs base | ours | TP | b1 ms base/ours/TP "
            "| b32 ms base/ours/TP | prune s ours/TP |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ratio']:.1f} | {_fmt(r['params_base'], 'k')} | {_fmt(r.get('params_ours'), 'k')} | "
            f"{_fmt(r.get('params_tp'), 'k') if 'tp_error' not in r else 'fails'} | {_fmt(r['macs_base'], 'M')} | "
            f"{_fmt(r.get('macs_ours'), 'M')} | {_fmt(r.get('macs_tp'), 'M') if 'tp_error' not in r else 'fails'} | "
            f"{_fmt(r.get('ms_base_b1'))}/{_fmt(r.get('ms_ours_b1'))}/{_fmt(r.get('ms_tp_b1'))} | "
            f"{_fmt(r.get('ms_base_b32'))}/{_fmt(r.get('ms_ours_b32'))}/{_fmt(r.get('ms_tp_b32'))} | "
            f"{_fmt(r.get('time_ours_s'))}/{_fmt(r.get('time_tp_s'))} |"
        )
    errors = [f"- {r['model']} {r['ratio']}: TP {r['tp_error']}" for r in rows if "tp_error" in r]
    errors += [f"- {r['model']} {r['ratio']}: ours {r['ours_error']}" for r in rows if "ours_error" in r]
    return "\n".join(lines + errors)


def _plot(rows):
    plt = pyplot()
    if plt is None:
        return
    half = [r for r in rows if abs(r["ratio"] - 0.5) < 1e-9]
    names = [r["model"] for r in half]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in ((axes[0], "params", "params kept at 50% channels"),
                           (axes[1], "macs", "MACs kept at 50% channels")):
        xs = range(len(names))
        ours = [r.get(f"{key}_ours", 0) / r[f"{key}_base"] for r in half]
        theirs = [r.get(f"{key}_tp", 0) / r[f"{key}_base"] for r in half]
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="torchprune")
        ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="Torch-Pruning")
        for x, r in zip(xs, half):
            if f"{key}_tp" not in r:
                ax.text(x + 0.2, 0.02, "fails" if "tp_error" in r else "n/a", rotation=90, ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(list(xs), names, rotation=45, ha="right")
        ax.set_ylabel("fraction of the unpruned model")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(RESULTS, "bench_structured.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
