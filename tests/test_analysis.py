import json

import pytest
import torch
from torch import nn

from torchprune.analysis import Summary, summary
from torchprune.masking import attach_mask


def masked(module: nn.Module, mask: torch.Tensor) -> nn.Module:
    """``module`` pruned with ``mask`` (true = kept), returned for chaining."""
    attach_mask(module, mask.to(torch.bool))
    return module


def row(s: Summary, name: str) -> dict:
    (found,) = [r for r in s.rows if r["name"] == name]
    return found


def masked_linear() -> nn.Linear:
    """Linear(4, 3) with all weights 1, bias (1, 0, 2) and 5 of its 12 weights masked out."""
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, 1:3] = False
    layer = masked(nn.Linear(4, 3), mask)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # stored values nonzero: only the mask makes them zero
        layer.bias.copy_(torch.tensor([1.0, 0.0, 2.0]))
    return layer


class TwiceNet(nn.Module):
    """fc is called twice; bn owns parameters but has no MACs; head has no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.act = nn.ReLU()  # owns no parameters: no row
        self.head = nn.Linear(4, 2, bias=False)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.act(self.bn(self.fc(self.fc(x)))))


def test_masked_linear_by_hand():
    s = summary(nn.Sequential(masked_linear()))
    r = row(s, "0")
    assert r["type"] == "Linear" and r["weight_shape"] == [3, 4]
    assert r["params"] == 12 + 3
    assert r["nonzeros"] == 7 + 2  # 7 unmasked weights, bias (1, 0, 2)
    assert r["sparsity"] == pytest.approx(5 / 12)  # weight only
    assert (r["macs_dense"], r["macs_effective"]) == (12, 7)  # one sample: in * out
    assert s.totals == {"params": 15, "nonzeros": 9, "sparsity": pytest.approx(5 / 12),
                        "macs_dense": 12, "macs_effective": 7}


def test_masked_linear_with_example_inputs_counts_positions():
    s = summary(nn.Sequential(masked_linear()), example_inputs=torch.randn(2, 5, 4))
    r = row(s, "0")
    assert (r["macs_dense"], r["macs_effective"]) == (2 * 5 * 12, 2 * 5 * 7)


def test_conv2d_stride_padding_groups_by_hand():
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)
    mask = torch.ones(6, 2, 3, 3, dtype=torch.bool)
    mask[0] = False  # first filter fully pruned: 18 of 108 weights
    model = nn.Sequential(masked(conv, mask))
    x = torch.randn(2, 4, 9, 9)  # output 5x5: (9 + 2 - 3) // 2 + 1

    r = row(summary(model, example_inputs=x), "0")
    assert r["weight_shape"] == [6, 2, 3, 3] and r["params"] == 108 + 6
    assert r["macs_dense"] == 2 * 5 * 5 * 6 * (4 // 2) * 3 * 3  # 5400
    assert r["macs_effective"] == 2 * 5 * 5 * 90
    assert r["sparsity"] == pytest.approx(18 / 108)

    s = summary(model)  # spatial size unknown without example inputs
    assert row(s, "0")["macs_dense"] is None and row(s, "0")["macs_effective"] is None
    assert s.totals["macs_dense"] is None and s.totals["macs_effective"] is None


def test_conv1d_dilation_and_unbatched_input():
    model = nn.Sequential(nn.Conv1d(2, 3, kernel_size=3, dilation=2, bias=False))
    r = row(summary(model, example_inputs=(torch.randn(1, 2, 10),)), "0")
    assert r["macs_dense"] == r["macs_effective"] == 1 * 6 * 3 * 2 * 3  # length 10 - 2 * 2
    r = row(summary(model, example_inputs=[torch.randn(2, 10)]), "0")  # (C, L), list accepted
    assert r["macs_dense"] == 6 * 3 * 2 * 3


def test_layer_used_twice_batchnorm_and_modes_restored():
    model = TwiceNet().train()
    model.bn.eval()  # mixed modes come back as they were
    running_mean = model.bn.running_mean.clone()
    s = summary(model, example_inputs=torch.randn(3, 4))

    assert [r["name"] for r in s.rows] == ["fc", "bn", "head", "unused"]
    assert row(s, "fc")["macs_dense"] == 2 * 3 * 16  # two calls of 3 samples
    assert row(s, "head")["macs_dense"] == 3 * 8
    assert row(s, "unused")["macs_dense"] == 0  # never called for this input
    bn = row(s, "bn")
    assert bn["type"] == "BatchNorm1d" and bn["params"] == 8 and bn["macs_dense"] is None
    assert s.totals["macs_dense"] == s.totals["macs_effective"] == 96 + 24
    assert model.training and model.fc.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, running_mean)


def test_hooks_removed_and_mode_restored_on_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        summary(model, example_inputs=torch.randn(1, 2))
    assert not model.fc._forward_hooks and model.training and model.fc.training


def test_totals_match_model_parameters_with_tied_and_root_parameters():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([0.0, 2.0]))  # owned by the root module
            self.embed = nn.Embedding(10, 6)
            self.norm = nn.LayerNorm(6)
            self.out = nn.Linear(6, 10)
            self.out.weight = self.embed.weight  # tied: counted once in the totals

    model = Mixed()
    s = summary(model)
    assert s.totals["params"] == sum(p.numel() for p in model.parameters()) == 2 + 60 + 12 + 10
    assert [r["name"] for r in s.rows] == ["", "embed", "norm", "out"]
    root = row(s, "")
    assert root["weight_shape"] is None and root["nonzeros"] == 1
    assert root["sparsity"] == pytest.approx(0.5)  # no weight: over its own parameters
    assert row(s, "out")["params"] == 70  # the row still shows what the layer owns
    assert "(root)" in str(s)


def test_totals_sparsity_is_over_weights_of_all_rows():
    a = masked(nn.Linear(4, 3), torch.zeros(3, 4))  # 12 of 12 weights pruned
    b = nn.Linear(6, 2, bias=False)
    with torch.no_grad():
        b.weight.fill_(1.0)
    s = summary(nn.Sequential(a, b))
    assert s.totals["sparsity"] == pytest.approx(12 / 24)
    assert s.totals["nonzeros"] == 12 + int(torch.count_nonzero(a.bias))
    assert s.totals["macs_effective"] == 0 + 12


def test_masked_subclass_reports_base_type():
    layer = masked_linear()
    assert type(layer).__name__ == "MaskedLinear"
    assert row(summary(nn.Sequential(layer)), "0")["type"] == "Linear"


def test_lazy_module_needs_example_inputs():
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="example_inputs"):
        summary(model)
    assert row(summary(model, example_inputs=torch.randn(2, 5)), "0")["macs_dense"] == 2 * 15


def test_to_dict_is_plain_and_json_round_trips():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 4))
    masked(model[2], torch.rand(4, 72) > 0.5)
    d = summary(model, example_inputs=torch.randn(1, 1, 8, 8)).to_dict()
    assert set(d) == {"layers", "totals"}
    assert json.loads(json.dumps(d)) == d
    for value in [*d["totals"].values(), *(v for r in d["layers"] for v in r.values())]:
        assert value is None or type(value) in (int, float, str, list)


def test_text_and_markdown_tables():
    model = nn.Sequential()
    model.add_module("wide", masked(nn.Linear(100, 100), torch.rand(100, 100) > 0.25))
    model.add_module("norm", nn.LayerNorm(100))
    s = summary(model)
    text = str(s)
    assert repr(s) == text
    for r in s.rows:
        assert r["name"] in text and f"{r['params']:,}" in text
    assert "10,100" in text and "Total" in text
    assert f"{100 * row(s, 'wide')['sparsity']:.2f}%" in text
    assert len({len(line) for line in text.splitlines()[:2]}) == 1  # fixed width header/rule

    md = s.to_markdown().splitlines()
    assert md[0].startswith("| Layer |") and set(md[1]) <= set("|-:")
    assert len(md) == 2 + len(s.rows) + 1
    assert all(line.count("|") == md[0].count("|") for line in md)


@pytest.mark.parametrize("bad", ["model", None, torch.randn(2)])
def test_model_must_be_module(bad):
    with pytest.raises(TypeError, match="`model`"):
        summary(bad)


@pytest.mark.parametrize("bad,got", [
    ([1, 2], r"list of \(int, int\)"),
    ((torch.randn(1, 2), 3.0), r"tuple of \(Tensor, float\)"),
    ({"x": torch.randn(1, 2)}, "got dict"),
    (3.0, "got float"),
])
def test_example_inputs_must_be_tensors(bad, got):
    with pytest.raises(TypeError, match="`example_inputs`") as error:
        summary(nn.Linear(2, 2), example_inputs=bad)
    assert error.match(got)


def test_tied_weight_counts_once_in_the_totals():
    from test_pruner import TiedNet

    import torchprune as tp

    model = TiedNet()
    tp.prune(model, sparsity=0.5, exclude=["head"])
    totals = summary(model).totals
    assert totals["params"] == sum(p.numel() for p in model.parameters())
    weights = 64 + 16  # the shared 8x8 weight once, and the head's 2x8
    assert totals["sparsity"] == 32 / weights
    assert abs(tp.sparsity(model) - 32 / weights) < 1e-12
