"""``python -m torchprune compress MODEL``: from a pretrained model to a measured, faster, pruned one.

For each sparsity asked for, starting each time from the dense model:

1. prune one-shot (``--method``: magnitude, wanda or sparsegpt, the last two calibrated on
   ``--calibration`` training texts): the "one-shot" model of the report;
2. recover for ``--recover-steps`` steps by distillation from the dense model (`tp.recover`): the
   loss is the sentence-embedding loss plus every transformer block's output (``--layers``, found
   by name), on the training texts. By default (``--gradual``) recovery starts from a fresh
   one-shot pruning to 78% of each layer's sparsity, and a magnitude `tp.Pruner` takes every layer
   the rest of the way during the first ``--ramp`` of the steps;
3. measure quality against the dense model on held-out texts, one-shot and recovered;
4. save (``model.pt`` for `tp.load`, and a ``save_pretrained`` folder for Hugging Face) and check
   that the file loads back to the same outputs;
5. sparsify (`tp.sparsify`, timed per layer at each latency shape) and time dense against sparse,
   interleaved, at each ``--latency`` shape (batch x tokens): in a fresh process that loads the
   saved model, as a deployment would (compress/latency.py says why), or with
   ``--time-in-process`` in this one.

It writes results.json, report.md and report.png to ``--out``, one folder per sparsity.

Text (Hugging Face models): ``--text FILE`` (one text per line; the first ``--heldout`` lines are
held out), or by default the prose that ships with Python: sentences of the language reference
(the first ``--heldout`` held out) and of the standard library's docstrings and comments
(`recovery.text.training_corpus`), plus those of the installed packages ``--text-packages``.
A torch model (a file that torch.load gives an nn.Module) runs instead on ``--data``: a torch.load
file with a list of input batches, the last ``--heldout`` of them held out; its latency is timed
on the first held-out batch and on that batch's first sample.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..analysis.machine import describe, machine_info
from ..calibration import Inputs
from ..calibration import batches as split_batches
from ..masking import masked_fraction
from ..oneshot import prune
from ..pruner import Pruner
from ..recovery import recover
from ..recovery import text as corpus
from ..schedules import Cubic
from . import report, training
from .allocation import attention_plan, is_attention, offset_plan
from .latency import time_dense_and_sparse, time_saved
from .models import Loaded, fresh_dense, load_model, reload_huggingface, reload_model, save_model
from .workload import max_abs_diff, outputs_of, positional, quality, text_batches, token_inputs

__all__ = ["add_arguments", "run"]

METHODS = ("magnitude", "wanda", "sparsegpt")
_SHAPE = re.compile(r"(\d+)x(\d+)")
#: --gradual and --ramp: one-shot to 78% of each layer's sparsity, the rest over the first 35% of the steps
#: (on MiniLM at 90%: cosine 0.926 after 5,200 steps, against 0.908 after 11,000 with the one-shot masks fixed,
#: each in 27 minutes on 2 cores: docs/guide/recovery.md)
GRADUAL, RAMP = 0.78, 0.35
#: --gradual: the masks are updated this many times during the ramp
RAMP_UPDATES = 20
_BLOCK_NAME = re.compile(r"(^|\.)(layer|layers|h|blocks|block)\.\d+$")  # transformer blocks in a ModuleList


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a sparsity in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a sparsity must be in (0, 1), got {value}")
    return value


def _shape(text: str) -> str:
    if not _SHAPE.fullmatch(text) or min(map(int, _SHAPE.fullmatch(text).groups())) < 1:
        raise argparse.ArgumentTypeError(f"a latency shape is BATCHxTOKENS such as 1x128, got {text!r}")
    return text


def _checked(convert, noun: str, ok, bound: str):
    """An argparse type: ``convert(text)`` (else "NOUN, got 'text'"), which ``ok`` must accept (else
    "must be BOUND, got text")."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{noun}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return parse


_positive = _checked(int, "a positive int", lambda v: v >= 1, ">= 1")
_non_negative = _checked(int, "a non-negative int", lambda v: v >= 0, ">= 0")
_offset = _checked(float, "a number in (-1, 1)", lambda v: -1 < v < 1, "in (-1, 1)")
_positive_float = _checked(float, "a positive number", lambda v: 0 < v < float("inf"), "a positive number")
_share = _checked(float, "a number in (0, 1]", lambda v: 0 < v <= 1, "in (0, 1]")


def _offset_rule(text: str) -> Tuple[str, float]:
    """``--offset``'s PATTERN=D: a regular expression and an offset in (-1, 1)."""
    pattern, equals, offset = text.rpartition("=")
    if not equals or not pattern:
        raise argparse.ArgumentTypeError(f"PATTERN=D such as 'query|key=0.1', got {text!r}")
    try:
        re.compile(pattern)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"{pattern!r} is not a regular expression ({error})") from None
    return pattern, _offset(offset)


def add_recovery_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the ``compress`` command's recovery step."""
    parser.add_argument("--recover-steps", type=_non_negative, default=1000, metavar="N",
                        help="distillation steps after pruning, 0 for none "
                             "(default 1000: about 10 minutes for MiniLM on 2 cores)")
    parser.add_argument("--gradual", type=_share, default=GRADUAL, metavar="START",
                        help="prune one-shot to START times each layer's sparsity, then raise every layer to its "
                             "own by magnitude during recovery, along a cubic schedule over the first --ramp of the "
                             f"steps, on the masked layers (default {GRADUAL}; 1: all one-shot, the masks fixed "
                             "while recovering; docs/guide/recovery.md)")
    parser.add_argument("--ramp", type=_share, default=RAMP, metavar="FRACTION",
                        help=f"the share of the recovery steps over which --gradual raises the sparsity "
                             f"(default {RAMP})")
    parser.add_argument("--batch-size", type=_positive, default=32, help="texts per recovery step (default 32)")
    parser.add_argument("--lr", type=_positive_float, default=2e-3,
                        help="peak AdamW learning rate of recovery (default 2e-3, the best of 1e-4 to 2e-3 on MiniLM)")
    parser.add_argument("--recover-on", choices=training.ON_CHOICES, default="auto",
                        help="train the sparse kernels' kept weights (sparse) or the masked dense layers (masked); "
                             f"auto: sparse from {training.SPARSE_FROM:.0%}% sparsity up (default)")
    parser.add_argument("--freeze-embeddings", action="store_true",
                        help="do not train the embedding tables (each step 1.1-1.3x faster; on MiniLM at 80%%, "
                             "300 steps gave cosine 0.877 frozen against 0.883 trained)")
    parser.add_argument("--no-teacher-cache", dest="teacher_cache", action="store_false",
                        help="run the dense teacher at every recovery step instead of keeping its outputs of each "
                             "training batch from the first round (bfloat16, about 0.5 GB per 100k tokens on MiniLM)")
    parser.add_argument("--layers", choices=("auto", "none"), default="auto",
                        help="auto: add each transformer block's output to the loss (default); none: final output only")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the ``compress`` command."""
    parser.add_argument("model", metavar="MODEL",
                        help="a Hugging Face model folder, or a torch.load-able nn.Module file")
    parser.add_argument("--sparsity", type=_sparsity, nargs="+", default=[0.9], metavar="S",
                        help="one or more sparsities of the pruned Linear layers (default 0.9)")
    parser.add_argument("--method", choices=METHODS, default="sparsegpt", help="one-shot criterion (default sparsegpt)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--attention-offset", type=_offset, default=None, metavar="D",
                       help="attention projections at --sparsity + D (e.g. -0.1), the other layers at the sparsity "
                            "that keeps the mean at --sparsity (default: --sparsity everywhere; on MiniLM at 0.9, "
                            "-0.1 recovered better)")
    split.add_argument("--offset", type=_offset_rule, nargs="+", default=None, metavar="PATTERN=D",
                       help="layers whose name a regular expression finds at --sparsity + D (the first pattern that "
                            "finds a layer), the other layers at the sparsity that keeps the mean at --sparsity; "
                            "on MiniLM 'query|key=0' 'value|attention.output=-0.2' recovered best "
                            "(docs/guide/recovery.md)")
    parser.add_argument("--granularity", default="weight", choices=("weight", "block:4x1", "block:8x1"),
                        help="single weights (default) or R x 1 blocks (the block-sparse kernel's format)")
    add_recovery_arguments(parser)
    parser.add_argument("--text", metavar="FILE", help="training and held-out text, one per line "
                                                          "(default: prose that ships with Python)")
    parser.add_argument("--text-packages", nargs="*", default=None, metavar="PACKAGE",
                        help="installed packages (import names, e.g. torch transformers) whose docstrings and "
                             "comments join the default training text (default: none)")
    parser.add_argument("--data", metavar="FILE", help="for a torch model: torch.load-able list of input batches")
    parser.add_argument("--calibration", type=_positive, default=512,
                        help="training texts (or batches) that calibrate wanda/sparsegpt (default 512)")
    parser.add_argument("--heldout", type=_positive, default=256,
                        help="held-out texts (or batches of --data) for quality (default 256)")
    parser.add_argument("--max-tokens", type=_positive, default=128, help="tokens per text at most (default 128)")
    parser.add_argument("--latency", type=_shape, nargs="*", default=["1x128", "8x128"], metavar="BxT",
                        help="shapes to time dense against sparse (default 1x128 8x128; none: skip)")
    parser.add_argument("--repeats", type=_positive, default=20,
                        help="timed calls per model and shape in each round (default 20)")
    parser.add_argument("--rounds", type=_positive, default=3,
                        help="rounds of --repeats interleaved calls; the speedup is the median round's (default 3)")
    parser.add_argument("--time-in-process", action="store_true",
                        help="time the models in this process, after recovery, instead of in a fresh process that "
                             "loads the saved model (the default: a long recovery left this process slower)")
    parser.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of recovery (default 0)")
    parser.add_argument("--out", default="compressed", help="output folder (default ./compressed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


class Workload:
    """The batches one run needs: calibration, recovery, held-out, and the latency inputs by shape."""

    def __init__(self, calibration: List[Any], training: List[Any], heldout: List[Any],
                 latency: Dict[str, Any], description: str):
        self.calibration, self.training, self.heldout = calibration, training, heldout
        self.latency, self.description = latency, description


def text_workload(loaded: Loaded, args: argparse.Namespace) -> Workload:
    """Tokenized batches from ``--text`` or from the prose that ships with Python."""
    if args.text:
        lines = corpus.text_file_sentences(args.text)
        if len(lines) <= args.heldout:
            raise SystemExit(f"--heldout {args.heldout} needs more than {args.heldout} lines in --text {args.text}, "
                             f"got {len(lines)}")
        training, heldout = corpus.split(lines, args.heldout)
        source = f"{args.text}: {len(training)} training texts, the first {len(heldout)} lines held out"
    else:
        packages = text_packages(args)
        try:
            training, heldout = corpus.training_corpus(args.heldout, packages)
        except ValueError as error:
            raise SystemExit(f"--text-packages: {error}") from None
        source = (f"prose that ships with Python {platform.python_version()}: "
                  f"{len(heldout)} held-out sentences of the language reference (digest {corpus.digest(heldout)}), "
                  f"{len(training)} training sentences (digest {corpus.digest(training)}: the rest of the reference, "
                  "standard-library docstrings and comments"
                  + "".join(f", {_version(name)}" for name in packages)
                  + (" docstrings and comments" if packages else "") + ")")
    tokenizer = loaded.tokenizer
    latency = {}
    for shape in args.latency:
        batch, tokens = map(int, shape.split("x"))
        latency[shape] = token_inputs(tokenizer, heldout, batch, tokens)
    return Workload(text_batches(tokenizer, training[:args.calibration], 16, args.max_tokens),
                    text_batches(tokenizer, training, args.batch_size, args.max_tokens, by_length=True),
                    text_batches(tokenizer, heldout, 32, args.max_tokens), latency, source)


def text_packages(args: argparse.Namespace) -> List[str]:
    """The packages whose prose joins the default training text: ``--text-packages``, by default none
    (torch's and transformers' gave MiniLM at 80% a held-out cosine of 0.937 against 0.940 without,
    in more time: docs/guide/recovery.md). None, not [], is the default so that `run` can refuse the
    option beside ``--text`` or ``--data``."""
    return list(args.text_packages or ())


def _version(package: str) -> str:
    """``torch 2.13.0``: the package and the version of the distribution of that name, when there is one."""
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return package


def _first_sample(value):
    """The first sample of a batch of inputs: every tensor cut to its first row (in dicts, tuples,
    lists and `tp.Inputs`)."""
    if isinstance(value, torch.Tensor):
        return value[:1]
    if isinstance(value, Inputs):
        return Inputs(*_first_sample(list(value.args)), **_first_sample(dict(value.kwargs)))
    if isinstance(value, dict):
        return {k: _first_sample(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_first_sample(v) for v in value)
    return value


def data_workload(model: nn.Module, args: argparse.Namespace) -> Workload:
    """The input batches of ``--data`` for a torch model (targets dropped): the last ``--heldout``
    held out; latency on the first held-out batch and on its first sample (``--latency`` shapes
    are token shapes: with any given, these two are timed)."""
    if not args.data:
        raise SystemExit("a torch model needs --data FILE: a torch.load-able list of input batches")
    batches = torch.load(args.data, map_location="cpu", weights_only=False)
    if not isinstance(batches, (list, tuple)) or len(batches) <= args.heldout:
        raise SystemExit(f"--data must hold a list of more than --heldout {args.heldout} batches, got "
                         f"{len(batches) if isinstance(batches, (list, tuple)) else type(batches).__name__}")
    batches = [inputs for inputs, _ in split_batches(batches, targets=False, model=model)]  # (inputs, targets) pairs
    training, heldout = batches[:-args.heldout], batches[-args.heldout:]
    latency = {"batch 1": _first_sample(heldout[0]), "first held-out batch": heldout[0]} if args.latency else {}
    return Workload(training[:args.calibration], training, heldout, latency,
                    f"{args.data}: {len(training)} training batches, {len(heldout)} held out")


def block_names(model: nn.Module) -> List[str]:
    """The transformer blocks of ``model``: modules named ``...layer.N`` / ``layers.N`` / ``h.N`` /
    ``blocks.N``, the repeated blocks of BERT, LLaMA, GPT-2 and ViT-style models."""
    return [name for name, _ in model.named_modules() if _BLOCK_NAME.search(name)]


def default_exclude(model: nn.Module) -> List[str]:
    """Layers left dense: a BERT-style pooler, which mean pooling never reads."""
    return ["pooler"] if isinstance(getattr(model, "pooler", None), nn.Module) else []


def compress_one(sparsity: float, loaded: Loaded, work: Workload, dense_outputs,
                 args: argparse.Namespace, folder: str) -> dict:
    """Prune, recover, measure, save and time one sparsity; the row of results.json."""
    student = fresh_dense(loaded)
    exclude = default_exclude(student)
    arguments = {"importance": args.method, "exclude": exclude}
    if args.granularity != "weight":
        arguments["granularity"] = args.granularity
    if args.method != "magnitude":
        arguments["data"] = work.calibration
    started = time.perf_counter()
    split, plan = _prune(student, sparsity, args, arguments)
    row = {"sparsity": sparsity, "prune_s": time.perf_counter() - started, "recover_s": None, "recovered": None,
           **split}
    row["oneshot"] = quality(dense_outputs, outputs_of(student, work.heldout))
    print(f"  {sparsity:.0%} one-shot {args.method}: cosine {row['oneshot']['cosine']:.4f} "
          f"({row['prune_s']:.1f} s)", flush=True)
    if args.recover_steps:
        pruner = None
        if args.gradual < 1:  # recovery starts from a lighter one-shot pruning and prunes the rest itself
            student = fresh_dense(loaded)
            _prune(student, sparsity, args, arguments, scale=args.gradual)
            row["start"] = {"sparsity": masked_fraction(student),
                            **quality(dense_outputs, outputs_of(student, work.heldout))}
            print(f"  {sparsity:.0%} recovery starts one-shot at {row['start']['sparsity']:.1%}: cosine "
                  f"{row['start']['cosine']:.4f}", flush=True)
            pruner = gradual_pruner(student, sparsity, plan, args.recover_steps, args.ramp, exclude,
                                    args.granularity)
        _recover(student, pruner, loaded, work, dense_outputs, args, folder, row)
    row["achieved_sparsity"] = masked_fraction(student)
    _save_and_check(student, loaded, work, folder, row)
    row["latency"] = _latency(student, loaded, work, args, row)
    for shape, timing in row["latency"].items():
        print(f"  {sparsity:.0%} {shape}: dense {timing['dense_ms']:.2f} ms, sparse {timing['sparse_ms']:.2f} ms, "
              f"{timing['speedup']:.2f}x{report.spread(timing['speedups'])} "
              f"({timing['swapped']}/{timing['layers']} layers sparse)", flush=True)
    return row


def _latency(student: nn.Module, loaded: Loaded, work: Workload, args: argparse.Namespace,
             row: dict) -> Dict[str, dict]:
    """Dense against sparse at every latency shape: in a fresh process on the saved model, or with
    ``--time-in-process`` in this one on ``student``; also in this one, with the reason in
    ``row["fresh_process_error"]`` and printed, when the fresh process fails (a torch model whose
    class only this process can import, say), so that the run's results are not lost."""
    if not work.latency:
        return {}
    if not args.time_in_process:
        try:
            found = time_saved(loaded, row["saved"]["tp"], work.latency, args.repeats, args.rounds)
            row["timed_in"] = "a fresh process"
            return found
        except RuntimeError as error:
            row["fresh_process_error"] = str(error).strip().splitlines()[-1]
            print(f"  {row['sparsity']:.0%}: timing in a fresh process failed ({row['fresh_process_error']}); "
                  "timing in this process", flush=True)
    row["timed_in"] = "this process"
    return {shape: time_dense_and_sparse(loaded.model, student, inputs, args.repeats, args.rounds)
            for shape, inputs in work.latency.items()}


def _prune(student: nn.Module, sparsity: float, args: argparse.Namespace, arguments: dict,
           scale: float = 1.0) -> Tuple[dict, Optional[Dict[str, float]]]:
    """Prunes ``student`` one-shot at a mean of ``scale * sparsity``, split by ``--attention-offset``
    or ``--offset`` (each layer at ``scale`` times its share of the split); returns the split for the
    results row (empty without one) and the per-layer plan at ``sparsity`` (None: uniform)."""
    exclude = arguments["exclude"]
    if args.attention_offset is not None:
        plan = attention_plan(student, sparsity, sparsity + args.attention_offset, exclude)
        split = {"attention_sparsity": sparsity + args.attention_offset,
                 "other_sparsity": next(v for name, v in plan.items() if not is_attention(name))}
    elif args.offset:
        plan = offset_plan(student, sparsity, args.offset, exclude)
        other = next(v for name, v in plan.items() if not any(re.search(p, name) for p, _ in args.offset))
        split = {"offset_sparsity": {**{pattern: sparsity + offset for pattern, offset in args.offset},
                                     "other": other}}
    else:
        prune(student, scale * sparsity, **arguments)
        return {}, None
    prune(student, scope={name: scale * value for name, value in plan.items()}, **arguments)
    return split, plan


def gradual_pruner(student: nn.Module, sparsity: float, plan: Optional[Dict[str, float]], steps: int,
                   ramp: float, exclude: List[str], granularity: str = "weight") -> Pruner:
    """The `tp.Pruner` that takes ``student`` (pruned one-shot to ``--gradual`` of its sparsity) to
    ``sparsity`` (or each layer to its ``plan``) by magnitude, along a cubic schedule that ends after
    ``ramp`` of the ``steps`` recovery steps and updates the masks `RAMP_UPDATES` times. Masks only
    grow, so each layer stays as pruned as the one-shot start left it until the schedule passes that."""
    end = max(1, round(ramp * steps))
    schedule = Cubic(end=end, every=max(1, end // RAMP_UPDATES))
    return Pruner(student, None if plan else sparsity, schedule, importance="magnitude",
                  granularity=granularity, scope=plan or "layer", exclude=exclude)


def recovery_loss(loaded: Loaded, args: argparse.Namespace) -> Tuple[str, List[str]]:
    """The recovery's loss kind and intermediate layers: the sentence-embedding loss for a Hugging
    Face model (cosine for a torch model's outputs), plus every transformer block with ``--layers auto``."""
    return ("embedding" if loaded.kind == "huggingface" else "cosine",
            block_names(loaded.model) if args.layers == "auto" else [])


def checkpoint_path(folder: str, args: argparse.Namespace, sparsity: float) -> str:
    """The recovery checkpoint of one sparsity, named by a digest of every option that shapes the run,
    so that a rerun with other options never resumes from it."""
    options = [args.model, sparsity, args.attention_offset, args.method, args.granularity, args.recover_steps,
               args.batch_size, args.lr,
               args.layers, args.text, args.data, args.calibration, args.heldout, args.max_tokens, args.seed,
               args.recover_on, args.freeze_embeddings, args.teacher_cache]
    options += [text_packages(args)] if text_packages(args) else []  # none: the name earlier versions gave
    options += [args.offset] if args.offset else []
    options += [("gradual", args.gradual, args.ramp)] if args.gradual < 1 else []  # none: as before --gradual
    return os.path.join(folder, f"recover-{hashlib.sha256(repr(options).encode()).hexdigest()[:10]}.pt")


def _recover(student: nn.Module, pruner: Optional[Pruner], loaded: Loaded, work: Workload, dense_outputs,
             args: argparse.Namespace, folder: str, row: dict) -> None:
    """Distils the dense model into ``student`` (resuming an interrupted run of the same options),
    with ``pruner`` raising its sparsity on the way (then on the masked layers, whose masks it changes)."""
    torch.manual_seed(args.seed)
    path = checkpoint_path(folder, args, row["sparsity"])
    loss, layers = recovery_loss(loaded, args)
    on = "masked" if pruner is not None else args.recover_on
    trained = training.training_copy(student, row["sparsity"], on, positional(work.training[0]))
    frozen = training.freeze_embeddings(trained) if args.freeze_embeddings else []
    try:
        recovery = recover(trained, loaded.model, work.training, args.recover_steps, pruner=pruner, loss=loss,
                           layers=layers, lr=args.lr, train_mode=False, checkpoint=path,
                           progress=not args.no_progress, log_every=max(1, args.recover_steps // 50),
                           teacher_cache=args.teacher_cache)
    finally:
        training.restore_grad(frozen)
    training.copy_back(trained, student)
    row["recovered_on"] = "sparse kernels" if trained is not student else "masked layers"
    os.remove(path)  # kept only to resume an interrupted run
    row["recover_s"], row["recover_history"] = recovery.seconds, recovery.history
    row["teacher_cache_gb"] = recovery.cache_bytes / 2 ** 30
    row["recovered"] = quality(dense_outputs, outputs_of(student, work.heldout))
    print(f"  {row['sparsity']:.0%} recovered ({args.recover_steps} steps, {recovery.seconds / 60:.1f} min): cosine "
          f"{row['recovered']['cosine']:.4f}", flush=True)


def _save_and_check(student: nn.Module, loaded: Loaded, work: Workload, folder: str, row: dict) -> None:
    """Saves ``student`` and loads every saved form back: the largest output difference of each."""
    row["saved"] = save_model(student, loaded, folder)
    row["reload_max_diff"] = max_abs_diff(student, reload_model(loaded, row["saved"]["tp"]), work.heldout[0])
    if "huggingface" in row["saved"]:
        row["reload_huggingface_max_diff"] = max_abs_diff(student, reload_huggingface(row["saved"]["huggingface"]),
                                                       work.heldout[0])


def _settings(loaded: Loaded, work: Workload, args: argparse.Namespace) -> Dict[str, object]:
    """The settings listed at the top of report.md."""
    loss, layers = recovery_loss(loaded, args)
    batch = f"{args.batch_size} texts" if loaded.kind == "huggingface" else "one --data batch"
    return {"model": f"{loaded.name} ({type(loaded.model).__name__}, {loaded.kind})",
            "method": f"{args.method}, granularity {args.granularity}, {_split(args)}"
                      + "".join(f" but {name}" for name in default_exclude(loaded.model)),
            "recovery": (f"{args.recover_steps} steps of {batch}, AdamW lr {args.lr} (warm-up, cosine decay), "
                         f"loss: {loss} + {len(layers)} block outputs (normalized MSE), dropout off, "
                         f"{_gradual(args)}on {_recover_on(args)}, embeddings "
                         f"{'frozen' if args.freeze_embeddings else 'trained'}, the teacher's outputs "
                         f"{'kept from the first round (bfloat16)' if args.teacher_cache else 'computed every step'}"
                         if args.recover_steps else "none"),
            "data": work.description,
            "latency": f"{args.rounds} round(s) of {args.repeats} interleaved calls per model and shape; medians, "
                       "and the median round's speedup; tp.sparsify timed per layer at each shape; "
                       + ("in the command's process, after recovery" if args.time_in_process else
                          "in a fresh process that loads the dense model and the saved model.pt")}


def _split(args: argparse.Namespace) -> str:
    """How report.md's settings describe the sparsity of each layer."""
    rest = "the other layers at the sparsity that keeps the row's mean"
    if args.attention_offset is not None:
        return f"attention projections at the row's sparsity {100 * args.attention_offset:+.0f} points, {rest}"
    if args.offset:
        return ", ".join(f"layers matching {pattern!r} at the row's sparsity {100 * offset:+.0f} points"
                         for pattern, offset in args.offset) + f", {rest}"
    return "the same sparsity in every prunable layer"


def _on(choice: str) -> str:
    return {"auto": f"sparse kernels from {training.SPARSE_FROM:.0%} sparsity, masked layers below",
            "sparse": "sparse kernels", "masked": "masked dense layers"}[choice]


def _recover_on(args: argparse.Namespace) -> str:
    if args.gradual < 1:
        return "masked dense layers (--gradual changes the masks)"
    return f"{args.recover_on} ({_on(args.recover_on)})"


def _gradual(args: argparse.Namespace) -> str:
    """How report.md's settings describe --gradual (empty when all the pruning is one-shot)."""
    if args.gradual == 1:
        return ""
    return (f"pruned gradually: one-shot to {args.gradual:.0%} of each layer's sparsity, then by magnitude to it "
            f"along a cubic schedule over the first {args.ramp:.0%} of the steps, ")


def folder_name(sparsity: float) -> str:
    """The output folder of one sparsity: s90 for 0.9, s87.5 for 0.875."""
    return f"s{100 * sparsity:.4g}"


def run(args: argparse.Namespace) -> int:
    """Runs the command with parsed ``args``; writes results.json, report.md and report.png."""
    args.sparsity = sorted(set(args.sparsity))
    names = [folder_name(s) for s in args.sparsity]
    if len(set(names)) < len(names):
        raise SystemExit(f"--sparsity values too close to tell apart in folder names: {args.sparsity}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gradual < 1 and args.recover_steps and args.recover_on == "sparse":
        raise SystemExit(f"--recover-on sparse trains fixed masks, but --gradual {args.gradual} changes them while "
                         "recovering: give --recover-on masked (or auto), or --gradual 1")
    if args.text and args.data:
        raise SystemExit("give --text (a Hugging Face model) or --data (a torch model), not both")
    if args.text_packages is not None and (args.text or args.data):
        raise SystemExit("--text-packages adds to the default text that ships with Python; with --text FILE "
                         "or --data FILE, put all the training data in that file")
    info = machine_info()
    loaded = load_model(args.model)
    if loaded.kind == "torch" and args.text:
        raise SystemExit("--text is for Hugging Face model folders; a torch model needs --data")
    work = text_workload(loaded, args) if loaded.kind == "huggingface" else data_workload(loaded.model, args)
    os.makedirs(args.out, exist_ok=True)
    print(f"machine: {describe(info)}; fp32\nmodel: {loaded.source} ({type(loaded.model).__name__})\n"
          f"data: {work.description}", flush=True)
    dense_outputs = outputs_of(loaded.model, work.heldout)
    rows, settings = [], _settings(loaded, work, args)
    for sparsity in args.sparsity:
        folder = os.path.join(args.out, folder_name(sparsity))
        rows.append(compress_one(sparsity, loaded, work, dense_outputs, args, folder))
        with open(os.path.join(args.out, "results.json"), "w") as handle:  # after each: a crash keeps the done ones
            json.dump({"machine": info, "settings": settings, "arguments": vars(args), "results": rows}, handle,
                      indent=1, default=str)
    shapes = list(work.latency)
    picture = report.plot(os.path.join(args.out, "report.png"), rows, shapes,
                          f"{loaded.name}: {args.method}, {describe(info)}")
    path = report.write_report(os.path.join(args.out, "report.md"), info, settings, rows, shapes, picture)
    print(f"wrote {path}")
    return 0
