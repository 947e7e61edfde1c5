"""The command line: `python -m torchprune demo` end to end, `bench`, and their argument checks."""

import json
import os
import subprocess
import sys

import pytest

import torchprune.__main__ as command_line
from torchprune.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLOTS = ("schedule.png", "accuracy_mlp.png", "accuracy_cnn.png", "layer_sparsity_mlp.png",
         "layer_sparsity_cnn.png", "importance_mlp.png", "input_pixels.png")


@pytest.mark.slow
def test_demo_quick_writes_the_report_and_is_deterministic(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["demo", "--quick", "--out", str(first), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "MLP: dense" in out and "CNN: dense" in out and "report:" in out
    text = (first / "report.md").read_text()
    for heading in ("## Accuracy, parameters and MACs", "## Targets", "## Latency", "## What the pruned MLP reads",
                    "## Channel pruning (CNN, 50% of the channels)", "## Adaptive pruning (MLP)",
                    "### Regrowth (RigL) against prune-only at 95%", "### tp.auto against uniform sparsity"):
        assert heading in text
    for plot in PLOTS:
        assert f"({plot})" in text
        assert (first / plot).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((first / "results.json").read_text())
    assert set(results["mlp"]["progressive"]) == {"0.5", "0.8", "0.9", "0.95"}
    assert "| MLP | progressive | 90.0% |" in text  # the achieved sparsity in the table
    # half of the channels removed physically: conv 16 -> 8, conv 32 -> 16, linear 64 -> 32, 10 classes kept
    assert "| dense | 16-32-64-10 |" in text and "| progressive (channel Pruner) | 8-16-32-10 |" in text
    assert "| one-shot + fine-tune | 8-16-32-10 |" in text
    assert set(results["cnn"]["channels 50%"]) == {"one-shot", "one-shot + fine-tune", "progressive",
                                                   "progressive, zeroed (before finalize)"}
    assert results["mlp"]["adaptive"]["history"] and len(results["mlp"]["rigl"]["rows"]) == 3
    assert set(results["auto"]["rows"]) == {"auto", *(f"uniform {s:.0%}" for s in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98))}
    main(["demo", "--quick", "--out", str(second), "--seed", "1"])
    again = json.loads((second / "results.json").read_text())
    for kind in ("mlp", "cnn"):
        assert again[kind] == results[kind]


@pytest.mark.parametrize("args,message", [
    (["demo", "--threads", "0"], "--threads must be >= 1"),
    (["demo", "--seed", "x"], "invalid int value"),
    (["train"], "invalid choice"),
    (["bench"], "NAME is missing"),
])
def test_bad_arguments_exit_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_not_be_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(target)])
    assert "--out must be a directory" in capsys.readouterr().err


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "torchprune", "demo", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--quick" in done.stdout and "--out" in done.stdout


@pytest.mark.parametrize("command", ["demo", "compress"])
def test_help_renders_every_option(command, capsys):
    """argparse %-formats help strings: a bare "70% s" once printed an argparse dict into --help."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "option_strings" not in text and "%(" not in text
    if command == "compress":
        assert "auto: sparse from 70%" in " ".join(text.split())


def test_bench_runs_the_checkouts_launcher_with_this_interpreter(monkeypatch):
    calls = []
    monkeypatch.setattr(command_line.subprocess, "call", lambda command, env: calls.append((command, env)) or 5)
    assert main(["bench", "oneshot", "--quick", "--methods", "magnitude"]) == 5  # the launcher's exit code
    command, env = calls[0]
    assert command == [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "oneshot", "--quick", "--methods",
                       "magnitude"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT  # the scripts import this torchprune


def test_bench_unknown_name_is_the_launchers_error(capfd):
    assert main(["bench", "nope"]) == 2
    err = capfd.readouterr().err
    assert "invalid choice: 'nope'" in err and "oneshot" in err


def test_bench_outside_a_source_checkout(monkeypatch, tmp_path, capsys):
    """An installed wheel has no benchmarks/ beside the package: say where they are, exit status 1."""
    monkeypatch.setattr(command_line, "BENCH_LAUNCHER", str(tmp_path / "benchmarks" / "run.py"))
    assert main(["bench", "oneshot"]) == 1
    assert "source checkout" in capsys.readouterr().err
