"""importance="entropy" (issue 18): the entropy of each channel's pooled activation (Luo & Wu 2017),
with fixed quarter-octave bins, checked against hand-computed values, at weight and channel level,
and in the Pruner."""

import math

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.importance import Entropy, resolve

pytestmark = pytest.mark.usefixtures("one_thread")


def entropy_of(values):
    """-sum p ln p of the quarter-octave bins of ``values`` (a list of pooled values), by hand."""
    bins = {}
    for v in values:
        key = "low" if v < 2.0 ** -24 else min(max(math.floor(4 * math.log2(v)), -96), 63)
        bins[key] = bins.get(key, 0) + 1
    return -sum(c / len(values) * math.log(c / len(values)) for c in bins.values())


def test_conv_output_is_pooled_per_sample_and_binned_by_hand():
    """A conv output [N, C, H, W]: each sample's channel value is the mean of max(y, 0) over H x W."""
    torch.manual_seed(0)
    y = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    scores = Entropy.per_channel(Entropy.output_statistics(y, 1))
    pooled = y.clamp(min=0).mean((2, 3))
    expected = [entropy_of(pooled[:, c].tolist()) for c in range(3)]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_linear_output_counts_every_row_as_a_sample():
    """A Linear's [batch, tokens, features] output: every token row is a sample, nothing is pooled."""
    y = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[1.0, 0.0], [1.1, 3.0]]])
    scores = Entropy.per_channel(Entropy.output_statistics(y, 2))
    assert scores[0].item() == pytest.approx(entropy_of([1.0, 2.0, 1.0, 1.1]), rel=1e-12)
    assert scores[1].item() == pytest.approx(entropy_of([0.0, 0.0, 0.0, 3.0]), rel=1e-12)


def test_the_hand_example_of_the_docstring():
    """Pooled values 1, 2, 1 fall in two bins (2/3, 1/3); a channel that never fires scores 0."""
    y = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]], [[[2.0, 2.0]], [[0.0, 0.0]]], [[[1.0, 1.0]], [[-1.0, 0.0]]]])
    scores = Entropy.per_channel(Entropy.output_statistics(y, 1))
    assert scores[0].item() == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)), rel=1e-12)
    assert scores[1].item() == 0.0


def test_bin_edges_low_and_high_values():
    """Below 2^-24 (and zero) share the first bin; above 2^16 go to the last; edges are exact powers."""
    y = torch.tensor([[0.0], [2.0 ** -30], [2.0 ** -24], [2.0 ** 20], [2.0 ** 16], [1.0], [1.25]],
                     dtype=torch.float64)
    counts = Entropy.output_statistics(y, 1)["counts"][0]
    assert counts.sum() == 7 and counts.shape == (Entropy.BINS,)
    assert counts[0] == 2  # 0 and 2^-30
    assert counts[1] == 1  # 2^-24, the first quarter octave
    assert counts[-1] == 2  # 2^16 and 2^20 clamped
    assert counts[97] == 1 and counts[98] == 1  # 1.0 and 1.25 (4 log2 1.25 = 1.29) in neighbouring bins


def test_counts_add_up_across_batches():
    """The counts of two halves sum to those of the whole: the statistic merges across batches."""
    torch.manual_seed(1)
    y = torch.randn(10, 4, 3, 3)
    whole = Entropy.output_statistics(y, 1)["counts"]
    halves = Entropy.output_statistics(y[:5], 1)["counts"] + Entropy.output_statistics(y[5:], 1)["counts"]
    assert torch.equal(whole, halves)


def test_doubling_a_channel_keeps_its_entropy():
    """Scaling by 2 moves every value four bins up: the entropy is the same (no clamping)."""
    torch.manual_seed(2)
    y = torch.rand(50, 3) + 0.1
    a = Entropy.per_channel(Entropy.output_statistics(y, 1))
    b = Entropy.per_channel(Entropy.output_statistics(2 * y, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_name_resolves():
    assert isinstance(resolve("entropy"), Entropy) and Entropy.requires_data and not Entropy.requires_loss


def test_weight_level_prunes_the_rows_of_the_lowest_entropy_channels():
    """Weight granularity gives each output row its channel's entropy: the constant channels go first."""
    torch.manual_seed(3)
    layer = nn.Linear(4, 6)
    with torch.no_grad():
        layer.weight[:3] = 0.0  # rows 0-2: the output is the bias alone, the same for every sample
        layer.bias[:3] = 1.0
    data = [torch.randn(16, 4) for _ in range(3)]
    tp.prune(layer, 0.5, importance="entropy", data=data)
    mask = tp.masks(layer)[""]
    assert not mask[:3].any() and mask[3:].all()


def test_requires_data():
    with pytest.raises(ValueError, match="data"):
        tp.prune(nn.Linear(4, 4), 0.5, importance="entropy")


def test_channel_level_removes_the_dead_filters():
    """Channel granularity: filters whose output never varies (dead after the ReLU) are removed first."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[[1, 4, 6, 7]] = 0.0
        model[0].bias[[1, 4, 6, 7]] = -1.0  # dead: max(y, 0) is always 0
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    kept_before = model[0].weight[[0, 2, 3, 5]].clone()
    tp.prune(model, 0.5, granularity="channel", importance="entropy", data=data, example_inputs=data[0][:1],
             exclude=[model[2], model[6]])
    assert model[0].out_channels == 4
    torch.testing.assert_close(model[0].weight, kept_before)


def test_pruner_observes_training_forwards_and_resumes():
    """The Pruner scores on the forwards of the training steps; its state_dict carries the counts."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = tp.Pruner(model, 0.5, tp.schedules.Cubic(begin=0, end=4, every=2), importance="entropy")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):  # updates at steps 0 and 2 rank and clear the counts; step 3 is counted
        model(torch.randn(8, 8)).sum().backward()
        optimizer.step()
        pruner.step()
        optimizer.zero_grad()
    state = pruner.state_dict()
    counts = state["importance"]["0"]["counts"]
    assert counts.shape == (16, Entropy.BINS) and counts.sum() == 16 * 8  # one step since the update at 2
    copy = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    resumed = tp.Pruner(copy, 0.5, tp.schedules.Cubic(begin=0, end=4, every=2), importance="entropy")
    copy.load_state_dict(model.state_dict())
    resumed.load_state_dict(state)
    assert torch.equal(resumed.state_dict()["importance"]["0"]["counts"], counts)
    for _ in range(1):  # step 4, the last update
        model(torch.randn(8, 8)).sum().backward()
        optimizer.step()
        pruner.step()
        optimizer.zero_grad()
    assert pruner.sparsity == pytest.approx(0.5, abs=0.02)
