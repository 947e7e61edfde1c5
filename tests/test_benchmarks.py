"""Each benchmark script runs end to end in --quick mode and writes its JSON (and PNG)."""

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
    assert "machine:" in stdout and "vs numpy" in stdout
    data = load(tmp_path, "linear")
    assert data["machine"]["threads"] == 2 and "numpy" in data["machine"]
    assert {(r["out_features"], r["batch"]) for r in data["results"]} == {(768, 1), (768, 64)}
    for row in data["results"]:
        for key in ("F.linear ms", "numpy ms", "torch CSR ms", "torchprune ms"):
            assert row[key] > 0
        assert row["speedup vs best dense"] == pytest.approx(
            min(row["F.linear ms"], row["numpy ms"]) / row["torchprune ms"])
    assert (tmp_path / "bench_linear_quick.png").stat().st_size > 0


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
