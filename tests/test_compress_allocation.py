"""`--attention-offset` and `--offset`: layers at their own sparsity, the mean kept (compress/allocation.py)."""

import pytest
import torch
from torch import nn

from torchprune.compress.allocation import attention_plan, is_attention, offset_plan


class Block(nn.Module):
    """A transformer block's Linears by the names BERT gives them: 2 attention projections of 8 x 8 (128
    weights), a feed-forward pair of 8 x 32 and 32 x 8 (512 weights)."""

    def __init__(self):
        super().__init__()
        self.attention = nn.ModuleDict({"query": nn.Linear(8, 8), "output": nn.Linear(8, 8)})
        self.intermediate = nn.Linear(8, 32)
        self.output = nn.Linear(32, 8)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([Block(), Block()])
        self.pooler = nn.Linear(8, 8)


@pytest.mark.parametrize("name,inside", [
    ("encoder.layer.0.attention.self.query", True), ("h.3.attn.c_proj", True),
    ("model.layers.0.self_attn.q_proj", True), ("decoder.layers.1.encoder_attn.k_proj", True),
    ("encoder.block.0.layer.0.SelfAttention.q", True), ("decoder.block.0.layer.1.EncDecAttention.o", True),
    ("encoder.layer.0.intermediate.dense", False), ("model.layers.0.mlp.up_proj", False),
    ("model.layers.0.post_attention_layernorm", False), ("attention_head_scale", False), ("", False)])
def test_is_attention_matches_a_whole_name_part(name, inside):
    """A name part ending in attention/attn (any case) is attention; a part merely containing it is not."""
    assert is_attention(name) is inside


def test_plan_keeps_the_weighted_mean_and_leaves_excluded_layers_out():
    """Attention projections at the given sparsity, the rest at what keeps the mean over the pruned weights:
    0.9 * 1280 = 0.8 * 256 + s * 1024, so s = 0.925; the excluded pooler is not in the plan."""
    model = Encoder()
    plan = attention_plan(model, 0.9, 0.8, exclude=["pooler"])
    assert set(plan) == {name for name, m in model.named_modules() if isinstance(m, nn.Linear)} - {"pooler"}
    for name, value in plan.items():
        assert value == pytest.approx(0.8 if ".attention." in name else 0.925, abs=1e-12)
    sizes = {name: model.get_submodule(name).weight.numel() for name in plan}
    assert sum(plan[n] * sizes[n] for n in plan) / sum(sizes.values()) == pytest.approx(0.9, abs=1e-12)


@pytest.mark.parametrize("sparsity,attention,message", [
    (0.9, 1.0, "the attention projections would be at 1.000 with --sparsity 0.9"),
    (0.3, -0.1, "the attention projections would be at -0.100"),
    (0.1, 0.9, "would need the other layers at -0.100 (the attention projections hold 20.0% of the weights)"),
    (0.95, 0.7, "would need the other layers at 1.012")])
def test_plan_refuses_sparsities_outside_0_1_naming_the_option(sparsity, attention, message):
    with pytest.raises(SystemExit, match=r"^--attention-offset: .*" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.")):
        attention_plan(Encoder(), sparsity, attention, exclude=["pooler"])


def test_plan_needs_attention_and_other_layers():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(SystemExit, match="--attention-offset: no prunable layer of the model is inside an attention"):
        attention_plan(mlp, 0.5, 0.4)
    only = nn.Module()
    only.attn = nn.Linear(4, 4)
    with pytest.raises(SystemExit, match="--attention-offset: every prunable layer is an attention projection"):
        attention_plan(only, 0.5, 0.4)
    model = Encoder()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(SystemExit):
        attention_plan(model, 0.95, 0.7, exclude=["pooler"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # a plan only reads the model


def test_offset_plan_first_pattern_wins_and_the_rest_keeps_the_mean():
    """query at 0.9 + 0.05, the attention output (found by the second pattern only) at 0.9 - 0.2, the rest at
    what keeps the mean over the pruned weights: 0.9 * 1280 = (0.95 + 0.7) * 128 + s * 1024, so s = 0.91875."""
    model = Encoder()
    plan = offset_plan(model, 0.9, [("query", 0.05), ("attention", -0.2)], exclude=["pooler"])
    assert set(plan) == {name for name, m in model.named_modules() if isinstance(m, nn.Linear)} - {"pooler"}
    for name, value in plan.items():
        expected = 0.95 if name.endswith("query") else 0.7 if ".attention." in name else 0.91875
        assert value == pytest.approx(expected, abs=1e-12), name
    sizes = {name: model.get_submodule(name).weight.numel() for name in plan}
    assert sum(plan[n] * sizes[n] for n in plan) / sum(sizes.values()) == pytest.approx(0.9, abs=1e-12)


def test_offset_plan_matches_attention_plan_for_the_attention_pattern():
    model = Encoder()
    expected = attention_plan(model, 0.6, 0.5, ["pooler"])
    assert offset_plan(model, 0.6, [(r"\.attention\.", -0.1)], ["pooler"]) == expected


@pytest.mark.parametrize("offsets,message", [
    ([("nothing", 0.1)], "'nothing' finds no prunable layer; prunable layers: ['layer.0.attention.query'"),
    ([("query", 0.2)], "the layers 'query' finds would be at 1.000 with --sparsity 0.8"),
    ([("query", -0.9)], "the layers 'query' finds would be at -0.100"),
    ([("layer", 0.1)], "every prunable layer matches a pattern; leave some to keep the mean at --sparsity"),
    ([("attention", 0.1), ("query", -0.1)], "every layer 'query' finds is taken by an earlier pattern"),
    ([("attention", -0.8)], "the offsets with --sparsity 0.8 would need the other layers at 1.000 (the matched "
                             "layers hold 20.0% of the weights)")])
def test_offset_plan_refusals_name_the_option(offsets, message):
    model = Encoder()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(SystemExit) as error:
        offset_plan(model, 0.8, offsets, exclude=["pooler"])
    assert str(error.value).startswith("--offset: ") and message in str(error.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
