"""Question: on the models people use (torchvision, timm, Hugging Face), does channel pruning keep a
working, reloadable model that computes what zeroing the same channels computes, and how much does it
remove next to Torch-Pruning?

Every model is built with random weights (seed 0) and goes through, in its own subprocess with a time
limit for each library (a crash or a hang costs that cell, not the sweep):

1. ``tp.prune(model, RATIO, granularity="channel", importance="l2", example_inputs=x)`` at batch 2,
   timed (tracing included);
2. **runs**: an eval forward; **shape**: its output has the dense model's shape;
3. **backward**: a train-mode forward and backward;
4. **reload**: ``tp.save`` then ``tp.load`` into a fresh instance gives the same outputs (Hugging Face
   models also ``save_pretrained`` + ``from_pretrained``, column **hf reload**);
5. **exact**: removal equals zeroing. A fresh float64 copy has the same choice of channels (the
   groups where zeroing a channel is the same as removing it, and the head features of
   hand-written attention) removed on one copy and zeroed on another; the outputs must agree to
   1e-9 of their largest magnitude;
6. params and MACs left (`tp.summary`, MACs at the example input);
7. when ``torch_pruning`` is importable: Torch-Pruning's ``MetaPruner`` with
   ``GroupMagnitudeImportance(p=2)`` at the same ratio, the classifier ignored (the usual call), its
   params left, whether its model still runs with the output shape kept, and its pruning time
   (channel rows only: its head pruning needs per-model arguments).

Suites: ``torchvision`` (every classification model under 90M parameters), ``timm`` (50 popular
models), ``hf`` (seven small transformers built from configs: channel and head granularity) and
``test`` (tests/zoo.py's models and one small model per cause the sweep found: needs none of those
libraries; CI runs it through tests/test_bench_zoo.py).

    python benchmarks/bench_zoo.py [--suites torchvision,timm,hf,test] [--models resnet18,vit_b_16] [--quick]
                                   [--jobs 2 --threads 1]
    python benchmarks/bench_zoo.py --prune-time resnet50,vit_small_patch16_224 --repeats 5

Prints a table and writes results/bench_zoo.json (--prune-time: results/bench_zoo_prune_time.json).

torchvision's PyPI wheel is a CUDA build that fails to import beside a CPU torch ("operator
torchvision::nms does not exist"); classification models never call its ops, so when the plain
import fails the two op schemas are defined first (`import_torchvision`). Install the `zoo` extra's
packages with ``--no-deps`` so that pip keeps the local torch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import torchprune as tp  # noqa: E402
from torchprune.importance import resolve  # noqa: E402
from torchprune.structured.channels import choose_removal  # noqa: E402
from torchprune.structured.graph import DependencyGraph  # noqa: E402
from torchprune.structured.head_dims import shrink_head_dims, zero_head_dims  # noqa: E402
from torchprune.structured.plan import apply_plan, plan_from_removed, steps_of, zero_channels  # noqa: E402

from _common import RESULTS, describe, machine_info, write_json  # noqa: E402

TIMM = """resnet18 resnet50 resnet50d resnext26ts seresnext26d_32x4d efficientnet_b0 efficientnetv2_rw_t
tf_efficientnet_lite0 mobilenetv2_100 mobilenetv3_large_100 mnasnet_100 ghostnet_100 lcnet_050 rexnet_100
convnext_atto convnext_tiny convnextv2_atto regnetx_002 regnety_002 repvgg_a0 cspresnet50 cspdarknet53
densenet121 dla34 dpn68 res2net50_26w_4s ese_vovnet19b_dw nf_resnet26 resnetv2_50 inception_v3
vit_tiny_patch16_224 vit_small_patch16_224 deit_tiny_patch16_224 deit_small_patch16_224
swin_tiny_patch4_window7_224 beit_base_patch16_224 eva02_tiny_patch14_224 levit_128s efficientformer_l1
edgenext_x_small xcit_nano_12_p16_224 mixer_b16_224 poolformer_s12 pit_ti_224 maxvit_tiny_tf_224
coatnet_0_rw_224 mobilevit_xs fastvit_t8 efficientvit_b0 repvit_m1""".split()

HF = ["bert", "gpt2", "llama", "qwen2", "vit", "t5_encoder", "bart"]

#: A relative difference below this is summation order in float64 (about 1e-16 per add, over
#: sums of at most a few thousand terms of similar size, through a few dozen layers).
EXACT_RTOL = 1e-9

MAX_PARAMS_TORCHVISION = 90e6


# ---------------------------------------------------------------------------------------------
# the optional libraries


def import_torchvision():
    """torchvision, importable beside a CPU torch even when its wheel is a CUDA build (see the module
    docstring): the two op schemas its Python side needs are defined, and its fake-kernel
    registrations for ops this torch lacks are skipped."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode == 0:
        import torchvision
        return torchvision
    if "does not exist" not in probe.stderr:
        raise ImportError(probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "torchvision")
    register_fake = torch.library.register_fake

    def lenient(op, func=None, **kwargs):
        def register(f):
            try:
                register_fake(op, f, **kwargs)
            except RuntimeError:
                pass
            return f
        return register if func is None else register(func)

    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                   "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor")
    torch.library.register_fake = lenient
    try:
        import torchvision
    finally:
        torch.library.register_fake = register_fake
    import_torchvision.library = library  # the schemas live as long as the process
    return torchvision


def torch_pruning():
    try:
        import torch_pruning as tpp
    except ImportError:  # the comparison is optional; never a dependency of torchprune
        return None
    return tpp


# ---------------------------------------------------------------------------------------------
# the models: each suite's names, and a builder giving (model, example inputs, classifier name)


def torchvision_names():
    models = import_torchvision().models
    return [n for n in models.list_models(module=models)
            if list(models.get_model_weights(n))[0].meta["num_params"] < MAX_PARAMS_TORCHVISION]


def names_of(suite: str):
    if suite == "torchvision":
        return torchvision_names()
    if suite == "timm":
        return list(TIMM)
    if suite == "hf":
        return [f"{n}/{g}" for n in HF for g in ("channel", "head")]
    if suite == "test":
        import zoo
        return list(zoo.ZOO) + list(zoo.CAUSES)
    raise ValueError(f"`suite` must be one of torchvision, timm, hf, test, got {suite!r}")


def images(size, batch=2, dtype=torch.float32):
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype),)


def build_torchvision(name):
    models = import_torchvision().models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception's init-weights notice
        model = models.get_model(name, weights=None, **({"init_weights": True}
                                                         if name in ("googlenet", "inception_v3") else {}))
    head = next((n for n in ("fc", "classifier", "head", "heads") if hasattr(model, n)), None)
    head = last_linear(model, head)
    return model, images(299 if name == "inception_v3" else 224), head  # (its auxiliary head needs 299)


def build_timm(name):
    import_torchvision()
    import timm
    model = timm.create_model(name, pretrained=False)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, images(size), last_linear(model, model.default_cfg.get("classifier"))


def last_linear(model, under):
    """The name of the last Linear/Conv2d module under ``under`` (the classifier Torch-Pruning ignores)."""
    if under is None:
        return None
    if isinstance(under, (list, tuple)):
        under = under[0]
    found = None
    for name, module in model.named_modules():
        if (name == under or name.startswith(under + ".")) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            found = name
    return found


def hf_config(name):
    """(model class, config) of a small transformers model: two layers, width 128, four heads
    (LLaMA and Qwen2 with two key/value heads: grouped-query attention)."""
    import transformers as hf
    text = {"vocab_size": 1000, "max_position_embeddings": 64}
    if name == "bert":
        return hf.BertModel, hf.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=512, **text)
    if name == "gpt2":
        return hf.GPT2Model, hf.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=64, vocab_size=1000)
    if name in ("llama", "qwen2"):
        config = hf.LlamaConfig if name == "llama" else hf.Qwen2Config
        return (hf.LlamaModel if name == "llama" else hf.Qwen2Model), config(
            hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **text)
    if name == "vit":
        return hf.ViTModel, hf.ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=512, image_size=32, patch_size=8)
    if name == "t5_encoder":
        return hf.T5EncoderModel, hf.T5Config(d_model=128, d_ff=512, num_layers=2, num_heads=4, d_kv=32,
                                              vocab_size=1000)
    if name == "bart":
        return hf.BartModel, hf.BartConfig(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                           decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512,
                                           **text)
    raise ValueError(f"`name` must be one of {', '.join(HF)}, got {name!r}")


def build_hf(name):
    try:
        import_torchvision()  # transformers imports it when it is installed, and fails on a broken one
    except ImportError:
        pass
    cls, config = hf_config(name)
    model = cls(config)
    if name == "vit":
        return model, images(32), None
    return model, (torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1)),), None


def builder(suite: str, name: str):
    """A function of no arguments building the seeded model, its example inputs (batch 2) and the name
    of its classifier (or None), in eval mode."""
    def build():
        torch.manual_seed(0)
        if suite == "test":
            import zoo
            model, x = zoo.build(name)
            linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            return model, x, linears[-1] if linears else None
        model, x, head = {"torchvision": build_torchvision, "timm": build_timm,
                          "hf": build_hf}[suite](name.split("/")[0])
        return model.eval(), x, head
    return build


# ---------------------------------------------------------------------------------------------
# one model


def output(y):
    """The tensor a model's output is compared by: itself, a Hugging Face output's last hidden state,
    or the first item of a tuple."""
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state
    if isinstance(y, (tuple, list)):
        return output(y[0])
    raise TypeError(f"cannot compare a model output of type {type(y).__name__}")


def forward(model, x):
    with torch.no_grad():
        return output(model(*x))


def as_dtype(x, dtype):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in x)


def relative_difference(a, b):
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def removal_equals_zeroing(build, ratio):
    """The largest difference, relative to the output's largest magnitude, between removing and
    zeroing the same exact channels of a float64 copy (see the module docstring)."""
    model, x, _ = build()
    model, x = model.double(), as_dtype(x, torch.float64)
    graph = DependencyGraph(model, x)
    removed = choose_removal(model, graph, ratio, resolve("l2"), only_exact=True)
    zeroed = copy.deepcopy(model)
    zero_channels(zeroed, removed)
    apply_plan(model, plan_from_removed(model, removed, graph.modules, arrays=True), graph.modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shrunk = shrink_head_dims(model, x, ratio, 2.0)  # hand-written attention: fewer features per head
    for step in (s for s in steps_of(model) if s["kind"] == "head_dims"):
        zero_head_dims(zeroed.get_submodule(step["module"]), step["qk"], step["v"])
    return relative_difference(forward(zeroed, x), forward(model, x)), len(removed) + len(shrunk)


def backward_runs(model, x):
    model.train()
    try:
        y = output(model(*x))
        y.float().square().mean().backward()
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def reloads(model, build, x, expected, hf: bool):
    """tp.save + tp.load into a fresh instance (and, for transformers, save_pretrained +
    from_pretrained): whether each gives ``expected`` back."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.save(model, os.path.join(folder, "pruned.pt"))
        fresh = tp.load(os.path.join(folder, "pruned.pt"), build()[0])
        result = {"reload": bool(torch.allclose(forward(fresh, x), expected, rtol=1e-5, atol=1e-6))}
        if hf:
            model.save_pretrained(folder)
            try:
                again = type(model).from_pretrained(folder).eval()
            except Exception as error:  # a config that cannot describe the pruned model (heads of BERT, GPT-2)
                result["hf_reload"], result["hf_reload_error"] = False, failure(error)["error"]
            else:
                result["hf_reload"] = bool(torch.allclose(forward(again, x), expected, rtol=1e-5, atol=1e-6))
    return result


def params(model):
    return sum(p.numel() for p in model.parameters())


def prune_ours(build, ratio: float, granularity: str, row: dict) -> None:
    """Steps 1-6 of the module docstring on one model, into ``row``; a failing step ends it."""
    model, x, _ = build()
    row["params"] = params(model)
    dense = tp.summary(model, x).totals
    expected_shape = tuple(forward(model, x).shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        tp.prune(model, ratio, granularity=granularity, importance="l2", example_inputs=x)
        row["seconds"] = time.perf_counter() - start
    row["warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in caught
                              if issubclass(w.category, UserWarning)})
    y = forward(model, x)
    row["runs"], row["shape"] = True, tuple(y.shape) == expected_shape
    row["params_left"] = params(model) / row["params"]
    row["macs_left"] = tp.summary(model, x).totals["macs_dense"] / max(dense["macs_dense"], 1)
    row.update(reloads(model, build, x, y, hf=hasattr(model, "save_pretrained")))
    backward_runs(model, x)  # last: a train-mode forward moves BatchNorm's running statistics
    row["backward"] = True
    if granularity == "channel":
        row["exact_difference"], row["exact_members"] = removal_equals_zeroing(build, ratio)
        row["exact"] = row["exact_difference"] <= EXACT_RTOL


def prune_theirs(build, ratio: float, row: dict) -> None:
    """Torch-Pruning at the same ratio, the classifier ignored, into ``row``: its params left and
    whether its model still runs with the output shape kept."""
    tpp = torch_pruning()
    model, x, head = build()
    before, shape = params(model), tuple(forward(model, x).shape)
    start = time.perf_counter()
    pruner = tpp.pruner.MetaPruner(model, x[0], importance=tpp.importance.GroupMagnitudeImportance(p=2),
                                   pruning_ratio=ratio,
                                   ignored_layers=[model.get_submodule(head)] if head else [])
    pruner.step()
    row["seconds"], row["params_left"] = time.perf_counter() - start, params(model) / before
    y = forward(model, x)
    row["runs"], row["shape"] = True, tuple(y.shape) == shape


def failure(error: BaseException) -> dict:
    text = str(error).strip()
    return {"error": f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"}


def check_part(suite: str, name: str, ratio: float, part: str = "ours") -> dict:
    """One side of a row: ``part`` "ours" (steps 1-6) or "theirs" (step 7); a failing step ends it
    with its error."""
    build = builder(suite, name)
    result = {}
    try:
        if part == "ours":
            prune_ours(build, ratio, name.split("/")[1] if "/" in name else "channel", result)
        else:
            prune_theirs(build, ratio, result)
    except Exception as error:  # a row records what broke; the sweep goes on
        result.update(failure(error))
    return result


def check_model(suite: str, name: str, ratio: float, theirs: bool = True) -> dict:
    """One row of the sweep in this process: ours, and Torch-Pruning's when it is importable, ``theirs``
    is true and the row is a channel one."""
    row = {"suite": suite, "model": name, "ours": check_part(suite, name, ratio, "ours")}
    if theirs and torch_pruning() is not None and not name.endswith("/head"):
        row["theirs"] = check_part(suite, name, ratio, "theirs")
    return row


# ---------------------------------------------------------------------------------------------
# the sweep: one subprocess per model and library


def run_isolated(suite: str, name: str, ratio: float, timeout: float, part: str = "ours") -> dict:
    """check_part in a fresh interpreter, killed after ``timeout`` seconds (a hang or a crash is
    that part's error)."""
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "part.json")
        command = [sys.executable, os.path.abspath(__file__), "--one", suite, name, "--part", part,
                   "--ratio", str(ratio), "--row", result, "--threads", str(torch.get_num_threads())]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout:.0f} s"}
        if done.returncode != 0 or not os.path.exists(result):
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {done.returncode}: {tail[:200]}"}
        with open(result) as f:
            return json.load(f)


def sweep_row(suite: str, name: str, ratio: float, timeout: float, theirs: bool) -> dict:
    row = {"suite": suite, "model": name, "ours": run_isolated(suite, name, ratio, timeout, "ours")}
    if theirs and torch_pruning() is not None and not name.endswith("/head"):
        row["theirs"] = run_isolated(suite, name, ratio, timeout, "theirs")
    return row


def works(part: dict) -> bool:
    """The pruned model runs, keeps its output shape, trains and reloads (Hugging Face: both ways)."""
    return (not part.get("error") and part.get("runs", False) and part.get("shape", False)
            and part.get("backward", True) and part.get("reload", True) and part.get("hf_reload", True))


def summarize(rows) -> dict:
    """The issue's targets over the channel rows: how many work, how many remove > 10% of params,
    wrong removals, and the median params left next to Torch-Pruning's on the models both handle."""
    channel = [r for r in rows if "/" not in r["model"] or r["model"].endswith("/channel")]
    ours_ok = [r for r in channel if works(r["ours"])]
    both = [r for r in ours_ok if "theirs" in r and works(r["theirs"])]
    summary = {
        "models": len(channel),
        "works": len(ours_ok),
        "removes_over_10pct": sum(r["ours"]["params_left"] < 0.9 for r in ours_ok),
        "wrong_removals": [r["model"] for r in channel if r["ours"].get("exact") is False],
        "theirs_works": sum(works(r["theirs"]) for r in channel if "theirs" in r),
        "both": len(both),
    }
    if both:
        summary["median_params_left_ours"] = statistics.median(r["ours"]["params_left"] for r in both)
        summary["median_params_left_theirs"] = statistics.median(r["theirs"]["params_left"] for r in both)
        summary["theirs_0.1_below"] = [r["model"] for r in both
                                       if r["theirs"]["params_left"] <= r["ours"]["params_left"] - 0.1]
    return summary


def flag(part: dict, key: str) -> str:
    return "-" if key not in part else ("yes" if part[key] else "NO")


def table(rows) -> str:
    lines = ["| suite | model | runs | shape | backward | reload | hf reload | exact | params left | MACs left "
             "| prune s | TP params left | TP works | TP s | error |", "|" + "---|" * 15]
    for r in rows:
        ours, theirs = r["ours"], r.get("theirs", {})
        cells = [r["suite"], r["model"], flag(ours, "runs"), flag(ours, "shape"), flag(ours, "backward"),
                 flag(ours, "reload"), flag(ours, "hf_reload"), flag(ours, "exact"),
                 f"{ours['params_left']:.3f}" if "params_left" in ours else "-",
                 f"{ours['macs_left']:.3f}" if "macs_left" in ours else "-",
                 f"{ours['seconds']:.2f}" if "seconds" in ours else "-",
                 f"{theirs['params_left']:.3f}" if "params_left" in theirs else "-",
                 ("yes" if works(theirs) else "NO") if theirs else "-",
                 f"{theirs['seconds']:.2f}" if "seconds" in theirs else "-",
                 "; ".join(e for e in (ours.get("error"), theirs.get("error") and "TP: " + theirs["error"]) if e)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep(args) -> None:
    """Every model of ``args.suites`` (or ``args.models``), ``args.jobs`` subprocesses at a time."""
    cases = [(suite, name) for suite in args.suites.split(",") for name in names_of(suite)
             if not args.models or name in args.models.split(",")]

    def one(case):
        start = time.perf_counter()
        row = sweep_row(*case, args.ratio, args.timeout, not args.no_theirs)
        ours, theirs = row["ours"], row.get("theirs", {}).get("params_left", float("nan"))
        print(f"{case[0]:12s} {case[1]:32s} {'ok ' if works(ours) else 'BAD'} params left "
              f"{ours.get('params_left', float('nan')):.3f}  TP {theirs:.3f}"
              f"  ({time.perf_counter() - start:.0f} s) {ours.get('error', '')}", flush=True)
        return row

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(one, cases))  # (in the order of the cases)
    summary = summarize(rows)
    print(table(rows))
    print(json.dumps(summary, indent=1))
    tpp = torch_pruning()
    write_json(os.path.join(args.out, "bench_zoo.json"), {
        "machine": machine_info(), "ratio": args.ratio, "torch_pruning": getattr(tpp, "__version__", None),
        "summary": summary, "rows": rows})


def prune_times(args) -> None:
    """The wall time of the pruning call alone (tracing included), ours and Torch-Pruning's
    interleaved, each repeat on a freshly built model; medians. Run it on a quiet machine."""
    tpp = torch_pruning()
    results = {}
    for spec in args.prune_time.split(","):
        suite, name = spec.split(":")
        build = builder(suite, name)
        times = {"ours": [], "theirs": []}
        for _ in range(args.repeats):
            model, x, _ = build()
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tp.prune(model, args.ratio, granularity="channel", importance="l2", example_inputs=x)
            times["ours"].append(time.perf_counter() - start)
            if tpp is not None:
                row = {}
                try:
                    prune_theirs(build, args.ratio, row)
                except Exception:  # its pruned model may not run (timm's ViT): the call's time stands
                    pass
                times["theirs"].append(row["seconds"])
        results[spec] = {k: statistics.median(v) for k, v in times.items() if v}
        results[spec]["samples"] = times
        print(f"{spec:40s} ours {results[spec]['ours']:.2f} s" + (
            f"  Torch-Pruning {results[spec]['theirs']:.2f} s" if times["theirs"] else ""), flush=True)
    write_json(os.path.join(args.out, "bench_zoo_prune_time.json"), {
        "machine": machine_info(), "threads": torch.get_num_threads(), "ratio": args.ratio,
        "repeats": args.repeats, "torch_pruning": getattr(tpp, "__version__", None), "results": results})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default="torchvision,timm,hf,test",
                        help="comma-separated: torchvision, timm, hf, test")
    parser.add_argument("--models", default=None, help="comma-separated names (default: the whole suite)")
    parser.add_argument("--ratio", type=float, default=0.5, help="channel sparsity (default 0.5)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model (default 600)")
    parser.add_argument("--no-theirs", action="store_true", help="skip Torch-Pruning even when installed")
    parser.add_argument("--prune-time", default=None, help="SUITE:NAME,...: only time the pruning calls")
    parser.add_argument("--repeats", type=int, default=5, help="repeats for --prune-time (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per model (default 2)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models at a time (default 1; tracing is mostly one Python thread: "
                             "--jobs 2 --threads 1 on 2 cores)")
    parser.add_argument("--quick", action="store_true", help="the test suite only (needs none of the libraries)")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--one", nargs=2, metavar=("SUITE", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part", default="ours", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.suites = "test"
    if args.one:
        warnings.simplefilter("ignore", FutureWarning)
        with open(args.row, "w") as f:
            json.dump(check_part(*args.one, args.ratio, args.part), f)
        return
    print(describe(machine_info()), flush=True)
    if args.prune_time:
        prune_times(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
