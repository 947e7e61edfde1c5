"""The command line: `python -m torchprune demo` end to end, and its argument checks."""

import subprocess
import sys

import pytest

from torchprune.__main__ import main


def test_demo_runs_end_to_end_and_prints_the_summary(capsys):
    assert main(["demo", "--epochs", "3", "--finetune-epochs", "1", "--sparsity", "0.8", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "dense MLP 64-300-100-10: test accuracy" in out
    assert "pruned to 80.0%" in out
    for column in ("Layer", "Params", "Nonzeros", "Sparsity", "MACs (dense)", "MACs (effective)"):
        assert column in out
    total = next(line for line in out.splitlines() if line.startswith("Total"))
    assert "80.00%" in total


def test_demo_is_deterministic_for_a_seed(capsys):
    args = ["demo", "--epochs", "2", "--finetune-epochs", "1", "--seed", "3"]
    main(args)
    first = [l for l in capsys.readouterr().out.splitlines() if "accuracy" in l]
    main(args)
    second = [l for l in capsys.readouterr().out.splitlines() if "accuracy" in l]
    assert first == second and len(first) == 3


@pytest.mark.parametrize("args,message", [
    (["demo", "--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["demo", "--epochs", "0"], "--epochs must be >= 1"),
    (["train"], "invalid choice"),
])
def test_bad_arguments_exit_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "torchprune", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout
