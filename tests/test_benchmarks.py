"""Each benchmark script runs end to end in --quick mode and writes its JSON (and PNG)."""

import json
import os
import subprocess
import sys

import pytest

from torchprune.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
def test_cli_bench_runs_a_script(tmp_path, capfd):
    assert main(["bench", "conv", "--quick", "--out", str(tmp_path)]) == 0
    assert "speedup" in capfd.readouterr().out
    assert load(tmp_path, "conv")["results"]


def test_cli_bench_rejects_unknown_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "gpu"])
    assert "invalid choice" in capsys.readouterr().err
