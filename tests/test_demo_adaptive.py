"""The demo's tp.auto comparison (`torchprune.demo.adaptive.auto_vs_uniform`): a plan that is one of
the uniform models is reported as a tie with it, not through the interpolation; other plans are
compared with uniform sparsity interpolated at their measured latency."""

import pytest
import torch

from torchprune.analysis.auto import interpolate
from torchprune.demo import adaptive
from torchprune.demo.common import make_mlp


class FakePlan:
    def __init__(self, scope):
        self.scope = scope

    def to_markdown(self):
        return "(the plan)"


@pytest.fixture
def split():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(200, 64, generator=generator)
    y = torch.randint(0, 10, (200,), generator=generator)
    return x[:150], y[:150], x[150:], y[150:]


def run(monkeypatch, split, scope):
    monkeypatch.setattr(adaptive, "auto", lambda *args, **kwargs: FakePlan(scope))
    monkeypatch.setattr(adaptive, "UNIFORM", (0.5, 0.9))
    torch.manual_seed(0)
    return adaptive.auto_vs_uniform(make_mlp(), split, budget=1, seed=0, repeats=2)


def test_a_plan_that_is_a_uniform_model_is_a_tie_with_it(monkeypatch, split):
    found = run(monkeypatch, split, {"0": 0.9, "2": 0.9, "4": 0.9})
    rows = found["rows"]
    assert found["same as"] == "uniform 90%"
    assert rows["auto"]["test"] == rows["uniform 90%"]["test"]  # the same masks and fine-tuning
    assert found["uniform at plan latency"] == rows["uniform 90%"]["test"]
    text = adaptive.auto_section(found)
    assert "it is that model" in text and "a tie (**not better**)" in text and "interpolated" not in text


@pytest.mark.parametrize("scope", [{"0": 0.9, "2": 0.9}, {"0": 0.5, "2": 0.9, "4": 0.9}])
def test_other_plans_are_compared_with_uniform_interpolated_at_their_latency(monkeypatch, split, scope):
    found = run(monkeypatch, split, scope)
    rows = found["rows"]
    assert found["same as"] is None
    expected = interpolate([(rows[k]["latency"], rows[k]["test"]) for k in ("uniform 50%", "uniform 90%")],
                           rows["auto"]["latency"])
    assert found["uniform at plan latency"] == expected
    text = adaptive.auto_section(found)
    assert "it is that model" not in text
    assert ("(interpolated)" in text) == (expected is not None)
