"""Per-layer sensitivity curves and the allocation that meets a global target."""

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.analysis.sensitivity import Sensitivity

from conftest import TinyGPT, assert_unchanged, make_mlp, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_layer_is_pruned_alone_and_restored_exactly():
    model = make_mlp()
    tp.prune(model, scope={"2": 0.25})  # an already pruned layer must come back with its mask
    before = snapshot(model)
    seen = []

    def evaluate(m):
        seen.append({name: round(float((tp.masking.effective_weight(layer) == 0).float().mean()), 3)
                     for name, layer in m.named_children() if isinstance(layer, nn.Linear)})
        return 1.0 - sum(seen[-1].values())

    sens = tp.sensitivity(model, evaluate, sparsities=(0.5, 0.75), progress=False)
    assert_unchanged(model, before)
    assert seen[0] == {"0": 0.0, "2": 0.25, "4": 0.0}  # the baseline
    assert seen[1] == {"0": 0.5, "2": 0.25, "4": 0.0}  # layer 0 alone at 50%
    assert seen[4] == {"0": 0.0, "2": 0.75, "4": 0.0}  # layer 2 at 75% (its mask kept)
    assert list(sens.curves) == ["0", "2", "4"] and list(sens.curves["0"]) == [0.5, 0.75]
    assert sens.damage("0", 0.5) == pytest.approx(0.5)
    assert sens.sizes == {"0": 512, "2": 768, "4": 96}
    assert "| 0 | 512 |" in sens.to_markdown()


def test_real_accuracy_sensitivity_the_last_layer_hurts_more():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    y = (x[:, :4].argmax(1))
    model = make_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    sens = tp.sensitivity(model, lambda m: float((m(x).argmax(1) == y).float().mean()), sparsities=(0.9,),
                          progress=False)
    assert sens.damage("4", 0.9) > 0.0


def _fake(curves, sizes, baseline=1.0):
    return Sensitivity(baseline, curves, sizes, higher_is_better=True)


def test_allocate_meets_the_target_and_prefers_robust_layers():
    model = make_mlp()  # sizes 512, 768, 96
    sizes = {"0": 512, "2": 768, "4": 96}
    sens = _fake({"0": {0.5: 0.99, 0.9: 0.9}, "2": {0.5: 1.0, 0.9: 0.99}, "4": {0.5: 0.5, 0.9: 0.1}}, sizes)
    plan = tp.allocate(model, 0.6, sens)
    pruned = sum(plan[k] * sizes[k] for k in sizes)
    assert pruned == pytest.approx(0.6 * sum(sizes.values()), abs=1)
    assert plan["4"] == 0.0 and plan["2"] == pytest.approx(0.9)  # the fragile layer is spared
    tp.prune(model, scope=plan)
    assert tp.sparsity(model) == pytest.approx(0.6, abs=2 / 1376)


def test_allocate_with_a_loss_metric_and_noisy_curves():
    sizes = {"0": 512, "2": 768, "4": 96}
    sens = Sensitivity(2.0, {"0": {0.5: 2.5, 0.9: 2.4}, "2": {0.5: 2.0, 0.9: 3.0}, "4": {0.5: 9.0, 0.9: 9.0}},
                       sizes, higher_is_better=False)  # layer 0 "improves" from 50% to 90%: noise, clipped
    plan = tp.allocate(make_mlp(), 0.3, sens)
    assert plan["4"] == 0.0 and plan["2"] > 0
    assert sum(plan[k] * sizes[k] for k in sizes) == pytest.approx(0.3 * 1376, abs=1)


def test_allocate_errors():
    sizes = {"0": 512, "2": 768, "4": 96}
    sens = _fake({"0": {0.5: 0.9}, "2": {0.5: 0.9}, "4": {0.5: 0.9}}, sizes)
    with pytest.raises(ValueError, match="highest measured sparsities"):
        tp.allocate(make_mlp(), 0.6, sens)
    with pytest.raises(ValueError, match=r"`target_sparsity` must be in \[0, 1\)"):
        tp.allocate(make_mlp(), 1.2, sens)
    with pytest.raises(TypeError, match="`sensitivity`"):
        tp.allocate(make_mlp(), 0.5, {"0": {}})
    with pytest.raises(ValueError, match="does not have"):
        tp.allocate(make_mlp(), 0.1, _fake({"fc": {0.5: 1.0}}, {"fc": 3}))


def test_sensitivity_argument_checks():
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="`sparsities` must be"):
        tp.sensitivity(model, lambda m: 1.0, sparsities=(0.5, 1.0))
    with pytest.raises(TypeError, match="`evaluate` must be callable"):
        tp.sensitivity(model, 3)
    with pytest.raises(TypeError, match="`evaluate` must return a number"):
        tp.sensitivity(model, lambda m: "good", progress=False)
    with pytest.raises(ValueError, match="`importance` must be one of"):
        tp.sensitivity(model, lambda m: 1.0, importance="hessian")
    assert_unchanged(model, before)


def test_tied_output_layer_is_left_out_with_a_warning():
    model = TinyGPT()
    with pytest.warns(UserWarning, match=r"layer 'lm_head' left unpruned: Embedding 'wte' shares its weight") as record:
        result = tp.sensitivity(model, lambda m: 0.0, sparsities=[0.5])
    assert len(record) == 1 and record[0].filename == __file__
    assert set(result.curves) == {"mlp"} and not tp.masks(model)
    with pytest.warns(UserWarning, match=r"layer 'lm_head' left unpruned") as record:
        plan = tp.allocate(model, 0.5, method="owl", data=[torch.arange(16).view(2, 8)])
    assert len(record) == 1 and record[0].filename == __file__ and set(plan) == {"mlp"}
