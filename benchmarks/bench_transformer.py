"""Does sparsify() make a pruned transformer encoder faster end to end, and how far could it go?

One question: take a real encoder, prune every Linear layer of its encoder blocks by magnitude, and
run it dense, masked and sparsified on the CPU (fp32, inference): how much faster is the whole
forward, and how does that compare with what the Linears alone gained and with the ideal ceiling
that the rest of the model (attention products, softmax, LayerNorm, GELU, embeddings) leaves?

Models (``--models``; each is skipped with a line that says why when its packages are missing):

* ``minilm``: all-MiniLM-L6-v2, pretrained (`_encoder.load_encoder`, the ``bench`` extra):
  6 blocks, hidden 384, feed-forward 1536, 36 encoder Linears;
* ``bert-base``: ``transformers.BertModel(BertConfig())`` with random weights (seed 0): 12 blocks,
  hidden 768, feed-forward 3072, 72 encoder Linears (needs ``transformers`` only).

Inputs: ``batch x 128`` random token ids (fixed generator, uniform over the vocabulary; the speed
of an encoder does not depend on which tokens it reads) with an all-ones attention mask, called
as ``model(input_ids, attention_mask)``; batches 1 and 8.

For each model and sparsity (0.5, 0.7, 0.8, 0.9, 0.95), a copy of the dense model is pruned with
``tp.prune(copy, sparsity=s, exclude=...)``, magnitude, the same sparsity in every layer; excluded
is every Linear outside ``model.encoder``: the pooler, which reads one token per sequence (a
one-row product, negligible) and which a mean-pooled sentence embedding never uses. Per batch:

* dense:  the original model; masked: the pruned model as ``tp.prune`` leaves it (masked layers);
* sparse: ``tp.sparsify(masked, example_inputs=(ids, mask))``, which times each layer on its real
  input (batch x 128 rows) and swaps only those whose sparse kernel measured faster (counted); the
  layers it keeps stay masked, as in the masked model;
* sparse and masked ``last_hidden_state`` are compared (rtol = atol = 1e-4, about 1000 float32
  ulps of LayerNorm outputs of order 1: the sparse kernel sums in another order); a disagreement
  is printed and recorded, not hidden;
* the three run in one interleaved loop under ``torch.inference_mode()`` (`_common.time_interleaved`),
  medians of ``--repeats``;
* per-layer split: one more forward of the dense and of the sparse model (``HOOKED_PASSES`` each,
  alternated, the pass with the median total kept) with forward pre/post hooks taking
  ``time.perf_counter()`` around each pruned layer's call (Linear or SparseLinear). From it:
  the share of dense time outside the pruned Linears, the Amdahl ceiling
  ``dense / (outside + linears * (1 - s))`` (the whole-model speedup if every pruned Linear ran
  exactly 1/(1-s) times faster), and the Linear-only speedup the sparse model measured
  (dense Linear time / sparse Linear time, kept-dense layers included).

Sparse fine-tuning (``--train-sparsities``, default 0.9; ``--train-batch``, default 8): one training
step (train mode, forward, loss = mean square of ``last_hidden_state``, backward, AdamW step) of
the dense model, of the masked model (masked layers, the weights stay dense) and of
``tp.sparsify(masked, min_sparsity=0.0)`` (every pruned Linear swapped: the stored values are the
trained parameters and the backward runs the sparse kernels), interleaved, medians; each runner
owns its copy of the model and its optimizer, so the steps really train.

``--granularity block:4x1`` (or block:8x1) prunes whole R x 1 blocks instead of single weights, so
that sparsify stores them in the block format (``tp.nn.SparseLinear`` "bsr"); files get
``_block4x1`` in their name. Its accuracy cost: bench_oneshot.py with the same option.
``--granularity 2:4`` (or 1:4, 4:8, 2:8, 1:8) keeps N of every M inputs, so that sparsify stores the
layers in the N:8 format ("nm"); the sparsity is then 1 - N/M (``--sparsities`` is ignored) and files
get ``_24`` in their name.

Prints the machine, then a table per model; writes bench_transformer[_block4x1][_quick].json and .png
(speedup against sparsity, a panel per model, a colour per batch, the Amdahl ceiling dashed).

    python benchmarks/bench_transformer.py [--quick] [--repeats 10] [--threads 2] [--out benchmarks/results]
                                           [--models minilm bert-base] [--sparsities 0.5 ...] [--batches 1 8]
                                           [--tokens 128]

``--quick``: all-MiniLM-L6-v2 only, 90%, batch 1, at most 3 repeats.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchprune as tp  # noqa: E402
from torchprune.masking import masked_fraction  # noqa: E402

from _common import (  # noqa: E402
    RESULTS,
    describe,
    machine_info,
    pyplot,
    save_figure,
    set_threads,
    time_interleaved,
    write_json,
)
from _encoder import load_encoder, missing_packages, skip_message  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
BATCHES = (1, 8)
TOKENS = 128
GRANULARITIES = ("weight", "block:4x1", "block:8x1", "2:4", "1:4", "4:8", "2:8", "1:8")
SEED = 0
QUICK = {"models": ("minilm",), "sparsities": (0.9,), "batches": (1,)}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
HOOKED_PASSES = 3
TRAIN_SPARSITIES = (0.9,)
TRAIN_BATCH = 8


class Model(NamedTuple):
    """A row group of the tables: its label and how to build it (the dense model in eval mode, or
    None and the line saying why it is skipped)."""

    label: str
    build: Callable[[], Tuple[Optional[nn.Module], str]]


def pretrained_minilm() -> Tuple[Optional[nn.Module], str]:
    missing = missing_packages()
    if missing:
        return None, skip_message(missing, "all-MiniLM-L6-v2 (a pretrained encoder)")
    return load_encoder()[0], ""


def random_bert_base() -> Tuple[Optional[nn.Module], str]:
    if "transformers" in missing_packages():
        return None, skip_message(["transformers"], "BERT-base (transformers.BertModel)")
    import transformers  # optional, and seconds to import: only when this model runs

    transformers.logging.set_verbosity_error()
    torch.manual_seed(SEED)
    return transformers.BertModel(transformers.BertConfig()).eval(), ""


MODELS = {
    "minilm": Model("all-MiniLM-L6-v2 (pretrained)", pretrained_minilm),
    "bert-base": Model("BERT-base (random weights, seed 0)", random_bert_base),
}


class LayerClock:
    """Seconds spent inside the calls of ``modules`` during a ``with`` block: a forward pre-hook
    reads time.perf_counter(), a forward hook adds the time since. The modules must not nest."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.seconds = 0.0
        self._start = 0.0
        self._handles: list = []

    def _before(self, module, args) -> None:
        self._start = time.perf_counter()

    def _after(self, module, args, output) -> None:
        self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> "LayerClock":
        for module in self.modules:
            self._handles += [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def split_times(models: Dict[str, Tuple[nn.Module, List[nn.Module]]], inputs: tuple,
                passes: int) -> Dict[str, Tuple[float, float]]:
    """Per model, (seconds of a whole forward, seconds inside its ``layers``) from ``passes``
    hooked forwards alternated between the models: the pass with the median total."""
    samples: Dict[str, List[Tuple[float, float]]] = {name: [] for name in models}
    for _ in range(passes):
        for name, (model, layers) in models.items():
            with LayerClock(layers) as clock:
                start = time.perf_counter()
                model(*inputs)
                total = time.perf_counter() - start
            samples[name].append((total, clock.seconds))
    return {name: sorted(pairs)[len(pairs) // 2] for name, pairs in samples.items()}


def amdahl_ceiling(total: float, linear: float, sparsity: float) -> float:
    """The whole-model speedup if the ``linear`` part of ``total`` ran exactly 1/(1-s) times faster."""
    return total / (total - linear + linear * (1 - sparsity))


def encoder_linears(model: nn.Module) -> List[str]:
    """Names of the nn.Linear layers inside ``model.encoder`` (the ones this benchmark prunes)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("encoder.")]


def other_linears(model: nn.Module) -> List[str]:
    """Names of the nn.Linear layers outside ``model.encoder`` (the pooler): left unpruned."""
    pruned = set(encoder_linears(model))
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in pruned]


def nm_ratio(granularity: str) -> Optional[float]:
    """The sparsity an N:M granularity fixes (1 - N/M), None for the others."""
    if ":" not in granularity or granularity.startswith("block"):
        return None
    n, m = (int(part) for part in granularity.split(":"))
    return 1 - n / m


def pruned_copy(dense: nn.Module, sparsity: float, granularity: str = "weight") -> nn.Module:
    """A copy of ``dense`` with its encoder Linears pruned to ``sparsity`` by magnitude (masked)."""
    amount = {} if nm_ratio(granularity) is not None else {"sparsity": sparsity}  # N:M fixes the sparsity
    return tp.prune(copy.deepcopy(dense), **amount, exclude=other_linears(dense), granularity=granularity)


def token_inputs(model: nn.Module, batch: int, tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask): random ids over the vocabulary from a fixed generator, all-ones mask."""
    generator = torch.Generator().manual_seed(SEED + batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=generator)
    return ids, torch.ones_like(ids)


def measure(dense: nn.Module, masked: nn.Module, names: List[str], sparsity: float, inputs: tuple,
            repeats: int) -> dict:
    """Sparsifies ``masked`` on ``inputs``, checks it, times dense / masked / sparse; the row of the JSON."""
    sparse = tp.sparsify(masked, example_inputs=inputs)
    sparse_modules = dict(sparse.named_modules())
    swapped = sum(isinstance(sparse_modules[name], tp.nn.SparseLinear) for name in names)
    with torch.inference_mode():
        reference = masked(*inputs).last_hidden_state
        output = sparse(*inputs).last_hidden_state
        max_diff = float((output - reference).abs().max())
        agree = bool(torch.allclose(output, reference, **TOLERANCE))
        med = time_interleaved({"dense": lambda: dense(*inputs), "masked": lambda: masked(*inputs),
                                "sparse": lambda: sparse(*inputs)}, repeats)
        dense_modules = dict(dense.named_modules())
        split = split_times({"dense": (dense, [dense_modules[n] for n in names]),
                             "sparse": (sparse, [sparse_modules[n] for n in names])}, inputs, HOOKED_PASSES)
    (dense_total, dense_linear), (sparse_total, sparse_linear) = split["dense"], split["sparse"]
    return {"batch": inputs[0].shape[0], "tokens": inputs[0].shape[1], "sparsity": sparsity,
            **{f"{k} ms": v * 1e3 for k, v in med.items()},
            "speedup sparse": med["dense"] / med["sparse"], "speedup masked": med["dense"] / med["masked"],
            "hooked dense ms": dense_total * 1e3, "hooked dense linear ms": dense_linear * 1e3,
            "hooked sparse ms": sparse_total * 1e3, "hooked sparse linear ms": sparse_linear * 1e3,
            "share outside linears": (dense_total - dense_linear) / dense_total,
            "amdahl ceiling": amdahl_ceiling(dense_total, dense_linear, sparsity),
            "linear speedup": dense_linear / sparse_linear,
            "sparsified": swapped, "pruned layers": len(names), "max abs diff": max_diff, "agree": agree}


def train_step(model: nn.Module, inputs: tuple) -> Callable[[], None]:
    """One AdamW step of a train-mode copy of ``model`` on ``inputs`` (loss: mean square of the
    hidden states), as a closure."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(*inputs).last_hidden_state.square().mean().backward()
        optimizer.step()

    return step


def measure_training(dense: nn.Module, masked: nn.Module, names: List[str], sparsity: float,
                     inputs: tuple, repeats: int) -> dict:
    """Times a training step of dense / masked / fully sparsified models, interleaved; a JSON row."""
    sparse = tp.sparsify(masked, min_sparsity=0.0)
    modules = dict(sparse.named_modules())
    swapped = sum(isinstance(modules[name], tp.nn.SparseLinear) for name in names)
    runners = {"dense": train_step(dense, inputs), "masked": train_step(masked, inputs),
               "sparse": train_step(sparse, inputs)}
    med = time_interleaved(runners, repeats)
    return {"batch": inputs[0].shape[0], "tokens": inputs[0].shape[1], "sparsity": sparsity,
            **{f"train {k} ms": v * 1e3 for k, v in med.items()},
            "train speedup sparse": med["dense"] / med["sparse"],
            "train speedup masked": med["dense"] / med["masked"], "sparsified": swapped,
            "pruned layers": len(names)}


def run_training(key: str, dense: nn.Module, args: argparse.Namespace) -> List[dict]:
    """The fine-tuning rows of one model, printed as they finish."""
    names = encoder_linears(dense)
    inputs = token_inputs(dense, args.train_batch, args.tokens)
    print(f"\n{MODELS[key].label}: one training step at batch {args.train_batch} x {args.tokens} tokens")
    print(f"{'sparsity':>8} {'dense ms':>9} {'masked ms':>10} {'sparse ms':>10} {'sparse':>7} {'masked':>7} "
          f"{'sparsified':>10}")
    rows = []
    for sparsity in args.train_sparsities:
        masked = pruned_copy(dense, sparsity, args.granularity)
        row = {"model": key, **measure_training(dense, masked, names, sparsity, inputs, args.repeats)}
        rows.append(row)
        print(f"{sparsity:>8.2f} {row['train dense ms']:>9.1f} {row['train masked ms']:>10.1f} "
              f"{row['train sparse ms']:>10.1f} {row['train speedup sparse']:>6.2f}x "
              f"{row['train speedup masked']:>6.2f}x {row['sparsified']:>5}/{row['pruned layers']:<4}", flush=True)
    return rows


def run_model(key: str, dense: nn.Module, args: argparse.Namespace) -> List[dict]:
    """Every sparsity x batch cell of one model, printed as it finishes; the rows."""
    names = encoder_linears(dense)
    exclude = other_linears(dense)
    parameters_mb = sum(p.numel() * p.element_size() for p in dense.parameters()) / 1e6
    print(f"\n{MODELS[key].label}: {parameters_mb:.1f} MB of parameters; pruned: its {len(names)} encoder "
          f"Linear layers; not pruned: {', '.join(exclude) or 'none'}")
    print(HEADER)
    print("-" * len(HEADER))
    inputs = {batch: token_inputs(dense, batch, args.tokens) for batch in args.batches}
    rows = []
    for sparsity in args.sparsities:
        masked = pruned_copy(dense, sparsity, args.granularity)
        achieved = masked_fraction(masked)
        for batch in args.batches:
            row = {"model": key, "label": MODELS[key].label, "achieved sparsity": achieved,
                   "granularity": args.granularity,
                   **measure(dense, masked, names, sparsity, inputs[batch], args.repeats)}
            rows.append(row)
            print(format_row(row), flush=True)
            if not row["agree"]:
                print(f"  DISAGREE: sparse vs masked last_hidden_state differ by up to {row['max abs diff']:.3g} "
                      f"(tolerance rtol={TOLERANCE['rtol']}, atol={TOLERANCE['atol']})", flush=True)
    return rows


HEADER = (f"{'batch':>5} {'sparsity':>8} {'dense ms':>9} {'masked ms':>10} {'sparse ms':>10} "
          f"{'speedup':>8} {'masked':>7} {'Amdahl':>7} {'Linears':>8} {'outside':>8} {'sparsified':>10} "
          f"{'max diff':>9}")


def format_row(row: dict) -> str:
    return (f"{row['batch']:>5} {row['sparsity']:>8.2f} {row['dense ms']:>9.2f} {row['masked ms']:>10.2f} "
            f"{row['sparse ms']:>10.2f} {row['speedup sparse']:>7.2f}x {row['speedup masked']:>6.2f}x "
            f"{row['amdahl ceiling']:>6.2f}x {row['linear speedup']:>7.2f}x {row['share outside linears']:>8.1%} "
            f"{row['sparsified']:>5}/{row['pruned layers']:<4} {row['max abs diff']:>9.1e}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="all-MiniLM-L6-v2 only, 90%%, batch 1, <= 3 repeats")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG (default benchmarks/results)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                        help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--sparsities", nargs="+", type=float, default=None,
                        help=f"default: {' '.join(map(str, SPARSITIES))}")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 8")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per sequence (default 128)")
    parser.add_argument("--train-sparsities", nargs="*", type=float, default=None,
                        help="sparsities of the fine-tuning step (default 0.9; none with --quick or an "
                             "empty list)")
    parser.add_argument("--train-batch", type=int, default=TRAIN_BATCH, help="batch of the fine-tuning step")
    parser.add_argument("--granularity", default="weight", choices=GRANULARITIES,
                        help="prune single weights (default), whole Rx1 blocks (the block-sparse format) or N "
                             "of every M inputs (the N:8 format; the sparsities become 1 - N/M)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"models": tuple(MODELS), "sparsities": SPARSITIES, "batches": BATCHES}
    for field in ("models", "sparsities", "batches"):
        setattr(args, field, list(getattr(args, field) or defaults[field]))
    if args.train_sparsities is None:
        args.train_sparsities = [] if args.quick else list(TRAIN_SPARSITIES)
    if args.repeats < 1 or args.threads < 1 or args.tokens < 1 or min(args.batches) < 1 or args.train_batch < 1:
        parser.error("--repeats, --threads, --tokens, --batches and --train-batch must be >= 1")
    for option in ("sparsities", "train_sparsities"):
        if not all(0 < s < 1 for s in getattr(args, option)):
            parser.error(f"--{option.replace('_', '-')} must be in (0, 1), got {getattr(args, option)}")
    if args.quick:
        args.repeats = min(args.repeats, 3)
    if nm_ratio(args.granularity) is not None:
        args.sparsities = [nm_ratio(args.granularity)]
        args.train_sparsities = args.train_sparsities and [nm_ratio(args.granularity)]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    limiter = set_threads(args.threads)  # noqa: F841  (kept alive for the run)
    info = machine_info()
    print(f"machine: {describe(info)}; fp32, inference_mode")
    print(f"batch x {args.tokens} random token ids, all-ones attention mask; magnitude pruning "
          f"(granularity {args.granularity}), the same sparsity in every encoder Linear")
    print(f"medians of {args.repeats} interleaved repeats; speedup and masked = dense time / that time; "
          "Amdahl = ceiling if the pruned Linears ran 1/(1-s) faster; Linears = dense / sparse time inside "
          "them; outside = share of dense time outside them (hooked passes); sparsified = Linears swapped "
          "by tp.sparsify; max diff = |sparse - masked| of last_hidden_state")
    results, training, skipped = [], [], {}
    for key in args.models:
        dense, why = MODELS[key].build()
        if dense is None:
            print(f"\n{MODELS[key].label}: {why}")
            skipped[key] = why
            continue
        results += run_model(key, dense, args)
        training += run_training(key, dense, args) if args.train_sparsities else []
    if not results:
        return 0
    block = "" if args.granularity == "weight" else "_" + args.granularity.replace(":", "")
    stem = "bench_transformer" + block + ("_quick" if args.quick else "")
    write_json(os.path.join(args.out, stem + ".json"),
               {"machine": info, "dtype": "float32", "tokens": args.tokens, "repeats": args.repeats,
                "hooked_passes": HOOKED_PASSES, "tolerance": TOLERANCE, "granularity": args.granularity,
                "skipped": skipped, "results": results,
                "training": training})
    plot(results, os.path.join(args.out, stem + ".png"), info)
    print(f"\nwrote {args.out}/{stem}.json and {stem}.png")
    return 0


CURVES = (("speedup sparse", "o-", "sparsified"), ("amdahl ceiling", "s--", "Amdahl ceiling"),
          ("linear speedup", "x:", "Linears only"))  # (row key, line style, legend) of each curve


def plot(results: List[dict], path: str, info: dict) -> None:
    """Speedup over dense against sparsity, a panel per model, a colour per batch: measured (solid),
    the Amdahl ceiling (dashed) and the Linear-only speedup (dotted)."""
    plt = pyplot()
    if plt is None:
        return
    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(max(8.0, 5.5 * len(models)), 4.5), squeeze=False)
    for ax, key in zip(axes[0], models):
        rows = [r for r in results if r["model"] == key]
        for i, batch in enumerate(sorted({r["batch"] for r in rows})):
            line = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["sparsity"])
            xs = [r["sparsity"] for r in line]
            for key, style, what in CURVES:
                ax.plot(xs, [r[key] for r in line], style, color=f"C{i}", label=f"{what}, batch {batch}")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sparsity of the encoder Linears")
        ax.set_ylabel("speedup over dense")
        ax.set_title(rows[0]["label"], fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
    save_figure(plt, fig, f"Sparse transformer encoders, fp32\n{describe(info)}", path)


if __name__ == "__main__":
    sys.exit(main())
