"""Score-to-mask selection: exact counts, deterministic ties, monotone masks, N:M layout."""

import pytest
import torch

from torchprune import selection


@pytest.mark.parametrize("numel,sparsity", [(10, 0.5), (7, 0.3), (100, 0.9), (1, 0.4), (33, 0.0), (64, 0.99)])
def test_by_ratio_hits_target_within_half_a_weight(numel, sparsity):
    torch.manual_seed(numel)
    scores = torch.randn(numel)
    keep = selection.by_ratio(scores, torch.ones(numel, dtype=torch.bool), sparsity)
    pruned = int((~keep).sum())
    assert abs(pruned - sparsity * numel) <= 0.5
    if pruned:  # the pruned ones are exactly the lowest scores
        assert scores[~keep].max() <= scores[keep].min() if keep.any() else True


def test_ties_pruned_in_index_order():
    scores = torch.zeros(2, 5)
    keep = selection.by_ratio(scores, torch.ones(2, 5, dtype=torch.bool), 0.3)
    expected = torch.ones(10, dtype=torch.bool)
    expected[:3] = False
    assert torch.equal(keep.flatten(), expected)


def test_already_pruned_stay_pruned_and_count():
    scores = torch.arange(10.0)
    mask = torch.ones(10, dtype=torch.bool)
    mask[9] = False  # the best weight was pruned earlier
    keep = selection.by_ratio(scores, mask, 0.3)
    assert not keep[9]
    assert int((~keep).sum()) == 3
    assert torch.equal(~keep, torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool))
    # a lower target than what is already pruned prunes nothing more, regrows nothing
    assert torch.equal(selection.by_ratio(scores, keep, 0.1), keep)


def test_global_ratio_ranks_across_layers():
    a, b = torch.tensor([1.0, 5.0, 9.0]), torch.tensor([[2.0, 3.0], [8.0, 0.5]])
    masks = [torch.ones(3, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)]
    ka, kb = selection.by_global_ratio([a, b], masks, 3 / 7)
    assert torch.equal(ka, torch.tensor([False, True, True]))
    assert torch.equal(kb, torch.tensor([[False, True], [True, False]]))


def test_global_ties_prune_earlier_layer_first():
    masks = [torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    ka, kb = selection.by_global_ratio([torch.ones(4), torch.ones(6)], masks[:1] + [torch.ones(6, dtype=torch.bool)],
                                       0.3)
    assert torch.equal(ka, torch.tensor([False, False, False, True]))  # 3 of 10, the first layer first
    assert kb.all()
    # ...but a global ranking never empties a layer: the first keeps its best (last tied) weight
    ka, kb = selection.by_global_ratio([torch.ones(4), torch.ones(4)], masks, 0.5)
    assert torch.equal(ka, torch.tensor([False, False, False, True]))
    assert torch.equal(kb, torch.tensor([False, True, True, True]))


def test_threshold_is_strict():
    scores = torch.tensor([0.1, 0.5, 0.7, 0.5])
    keep = selection.by_threshold(scores, torch.ones(4, dtype=torch.bool), 0.5)
    assert torch.equal(keep, torch.tensor([False, True, True, True]))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_n_of_m_linear(n, m):
    torch.manual_seed(0)
    scores = torch.randn(6, 16)
    keep = selection.n_of_m(scores, torch.ones(6, 16, dtype=torch.bool), n, m)
    groups = keep.view(6, 16 // m, m)
    assert (groups.sum(-1) == n).all()
    kept_min = scores.view(6, -1, m).masked_fill(~groups, float("inf")).min(-1).values
    pruned_max = scores.view(6, -1, m).masked_fill(groups, float("-inf")).max(-1).values
    assert (kept_min >= pruned_max).all()


def test_n_of_m_conv_groups_along_input_channels():
    torch.manual_seed(1)
    scores = torch.randn(5, 8, 3, 3)
    keep = selection.n_of_m(scores, torch.ones(5, 8, 3, 3, dtype=torch.bool), 2, 4)
    # at every (out, kh, kw), each block of 4 consecutive input channels keeps exactly 2
    per_group = keep.permute(0, 2, 3, 1).reshape(5, 3, 3, 2, 4).sum(-1)
    assert (per_group == 2).all()


def test_n_of_m_keeps_sparser_groups_and_ties_by_index():
    mask = torch.tensor([[False, False, False, True, True, True, True, True]])
    keep = selection.n_of_m(torch.ones(1, 8), mask, 2, 4)
    assert torch.equal(keep, torch.tensor([[False, False, False, True, False, False, True, True]]))
