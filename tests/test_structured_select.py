"""structured/select.py: the one selection that channels and heads share."""

import torch

from torchprune.structured.select import kept_counts, select


def test_global_scope_keeps_one_per_group():
    scores = [torch.tensor([0.1, 0.2]), torch.tensor([5.0, 0.05, 0.3])]
    # 4 of 5 asked; 0.2 and 5.0 would empty their groups, so 3 go
    assert [s.tolist() for s in select([range(2), range(3)], scores, 0.8, "global")] == [[0], [1, 2]]


def test_layer_scope_keeps_the_floor_of_the_kept_fraction():
    sizes = [range(n) for n in (8, 10, 3, 1)]
    scores = [torch.zeros(len(g)) for g in sizes]
    assert kept_counts(sizes, scores, 0.3, "layer") == [5, 7, 2, 1]
    assert kept_counts(sizes, scores, 0.5, "layer") == [4, 5, 1, 1]


def test_round_to_rounds_the_kept_count_half_up():
    sizes = [range(n) for n in (16, 12, 3)]
    scores = [torch.zeros(len(g)) for g in sizes]
    # 16 * 0.7 = 11.2 -> floor 11 -> 12 (nearest multiple of 4 halves up); 12 * 0.7 -> 8 -> 8; 3 < 4 keeps 3
    assert kept_counts(sizes, scores, 0.3, "layer", round_to=4) == [12, 8, 3]


def test_ties_go_by_index():
    assert select([range(4)], [torch.ones(4)], 0.5, "layer")[0].tolist() == [0, 1]
