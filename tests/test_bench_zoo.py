"""benchmarks/bench_zoo.py's checks on the test zoo, in CI, without torchvision, timm or
transformers: tests/zoo.py's models and one small model per cause the sweep of real architectures
found (``zoo.CAUSES``) each prune at 50%, keep their output shape, train, reload through
tp.save/tp.load, remove more than 10% of their parameters, and compute what zeroing the same
channels computes (float64)."""

import importlib.util
import os

import pytest

import zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench_zoo.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_zoo", os.path.join(ROOT, "benchmarks", "bench_zoo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(zoo.ZOO) + list(zoo.CAUSES))
def test_every_zoo_model_passes_the_sweep(bench, name):
    ours = bench.check_model("test", name, 0.5, theirs=False)["ours"]
    assert "error" not in ours, ours["error"]
    assert ours["runs"] and ours["shape"] and ours["backward"] and ours["reload"]
    assert ours["exact"], f"removal differs from zeroing by {ours['exact_difference']:.2e} of the output"
    assert ours["exact_members"] > 0 and ours["params_left"] < 0.9 and ours["macs_left"] < 0.9


def test_a_model_runs_in_its_own_process_and_a_bad_name_is_a_row(bench):
    good = bench.run_isolated("test", "mlp", 0.5, timeout=120)
    assert bench.works(good) and good["exact"]
    bad = bench.run_isolated("test", "no_such_model", 0.5, timeout=120)
    assert "KeyError" in bad["error"] and not bench.works(bad)


def test_the_summary_counts_the_targets(bench):
    def row(name, left, theirs=None, **ours):
        r = {"suite": "s", "model": name, "ours": {"runs": True, "shape": True, "backward": True, "reload": True,
                                                   "exact": True, "params_left": left, **ours}}
        if theirs is not None:
            r["theirs"] = {"runs": True, "shape": True, "params_left": theirs}
        return r

    rows = [row("a", 0.30, 0.25), row("b", 0.50, 0.30), row("c", 0.95, 0.95), row("d", 0.3, exact=False),
            row("e", 0.4, backward=False), {"suite": "s", "model": "f", "ours": {"error": "boom"}},
            row("g/head", 0.5)]
    summary = bench.summarize(rows)
    assert summary["models"] == 6 and summary["works"] == 4 and summary["removes_over_10pct"] == 3
    assert summary["wrong_removals"] == ["d"] and summary["both"] == 3
    assert summary["median_params_left_ours"] == 0.50 and summary["median_params_left_theirs"] == 0.30
    assert summary["theirs_0.1_below"] == ["b"]
