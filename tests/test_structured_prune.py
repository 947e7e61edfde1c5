"""Channel removal on every model of the zoo: same outputs as zeroing the channels, smaller plain
modules that state_dict / torch.save / jit.trace / torch.compile handle, selection rules, errors."""

import copy
import io

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.importance import resolve
from torchprune.structured import DependencyGraph
from torchprune.structured.channels import choose_removal
from torchprune.structured.plan import apply_plan, plan_from_removed, zero_channels

import zoo
from conftest import assert_unchanged, snapshot
from error_bounds import assert_same_function

NAMES = list(zoo.ZOO)


def params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("importance", ["l2", "random"])
def test_removal_equals_zeroing(name, importance):
    model, x = zoo.build(name)
    graph = DependencyGraph(model, x)
    removed = choose_removal(model, graph, 0.5, resolve(importance), only_exact=True)
    assert removed, f"{name}: nothing to remove"
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert params(pruned) < params(model)
    with torch.no_grad():
        assert_same_function(pruned, masked, *x)


@pytest.mark.parametrize("name", NAMES)
def test_prune_gives_a_smaller_plain_module(name, tmp_path):
    model, x = zoo.build(name)
    before = params(model)
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    assert params(model) < before
    with torch.no_grad():
        y = model(*x)
    # attributes follow the tensors: a fresh layer built from them has the same shapes
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
        elif isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        elif isinstance(m, nn.BatchNorm2d):
            assert m.running_mean.shape == (m.num_features,)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(model.state_dict())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    # nn.MultiheadAttention fails the re-trace check even unpruned
    traced = torch.jit.trace(model, x, check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), y)
        torch.testing.assert_close(traced(*x), y)
    # still traceable: a second round prunes further
    tp.prune(model, sparsity=0.3, granularity="channel", example_inputs=x)
    with torch.no_grad():
        model(*x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg", "resnet_basic", "transformer", "vit"])
def test_pruned_model_compiles(name):
    model, x = zoo.build(name)
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(*x), model(*x))


def test_onnx_export(tmp_path):
    pytest.importorskip("onnx")
    model, x = zoo.build("resnet_basic")
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    torch.onnx.export(model, x, str(tmp_path / "m.onnx"))


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_layer_scope_counts_and_keeps_one(sparsity):
    model, x = zoo.build("mlp")
    tp.prune(model, sparsity=sparsity, granularity="channel", example_inputs=x)
    assert model.fc1.out_features == max(1, int((1 - sparsity) * 32 + 1e-9))
    assert model.fc2.out_features == max(1, int((1 - sparsity) * 24 + 1e-9))
    assert model.fc3.out_features == 4  # the output stays


def test_l2_keeps_the_largest_neurons():
    model, x = zoo.build("mlp")
    w1, w2 = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x, importance="l2")
    # score of neuron i of fc1: (||fc1 row i||^2 / mean) + (||fc2 column i||^2 / mean), halved
    rows, cols = w1.pow(2).sum(1), w2.pow(2).sum(0)
    score = rows / rows.mean() + cols / cols.mean()
    kept = torch.sort(torch.sort(score, descending=True).indices[:16]).values
    torch.testing.assert_close(model.fc1.weight.detach(), w1[kept])


def test_round_to_and_global_scope():
    from torchprune.structured.channels import prune_channels

    model, x = zoo.build("mlp")
    prune_channels(model, x, 0.5, round_to=8)
    assert model.fc1.out_features % 8 == 0 and model.fc2.out_features % 8 == 0
    model, x = zoo.build("mlp")
    tp.prune(model, sparsity=0.5, granularity="channel", scope="global", example_inputs=x)
    assert model.fc1.out_features + model.fc2.out_features == 56 - 28


def test_exclude_keeps_a_layers_outputs_and_freeze_the_whole_layer():
    """features.3 excluded: its output channels stay, its input channels go with features.0's;
    frozen: both stay (tests/test_structured_exclude.py has the rest)."""
    model, x = zoo.build("vgg")
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x, exclude=["features.3"])
    assert model.features[3].out_channels == 16 and model.features[3].in_channels == 4
    assert model.features[7].out_channels == 8
    model, x = zoo.build("vgg")
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x, freeze=["features.3"])
    assert model.features[3].out_channels == 16 and model.features[3].in_channels == 8
    assert model.features[7].out_channels == 8


@pytest.mark.parametrize("importance", ["l1", "filter_norm", "bn_scale", "taylor", "activation"])
def test_criteria(importance):
    model, x = zoo.build("resnet_basic")
    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    before = snapshot(model)
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x, importance=importance,
             data=data, loss_fn=nn.functional.cross_entropy)
    assert params(model) < sum(v.numel() for k, v in before[0].items() if "running" not in k and "num_batches" not in k)
    assert model.training is False
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("importance", ["activation", "bn_scale"])
def test_attention_positions_without_an_output_layer_are_scored_by_their_weights(importance):
    """No layer outputs the q/k or v positions inside attention, and no norm scales them: their
    groups are scored by FilterNorm(2) rather than all tied at zero."""
    from torchprune.structured.scoring import group_scores

    model, x = zoo.build("vit")
    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
    inner = [g for g in DependencyGraph(model, x).groups if ("blocks.0.attn", "in_proj_weight", 0) in g.indices]
    got = group_scores(model, inner, resolve(importance), data=data)
    want = group_scores(model, inner, resolve("filter_norm"))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
        assert a.unique().numel() == len(a)


def test_bad_input_changes_nothing():
    model, x = zoo.build("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError, match="example_inputs"):
        tp.prune(model, sparsity=0.5, granularity="channel")
    with pytest.raises(ValueError, match="threshold"):
        tp.prune(model, threshold=0.1, granularity="channel", example_inputs=x)
    with pytest.raises(ValueError, match="`scope`"):
        tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x, scope={"fc1": 0.5})
    with pytest.raises(ValueError, match="data-driven"):
        tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x, importance="taylor")
    with pytest.raises(ValueError, match="`sparsity`"):
        tp.prune(model, sparsity=1.0, granularity="channel", example_inputs=x)
    with pytest.raises(ValueError, match="no attention module"):
        tp.prune(model, sparsity=0.5, granularity="head", example_inputs=x)
    with pytest.raises(ValueError, match="round_to"):
        from torchprune.structured.channels import prune_channels

        prune_channels(model, x, 0.5, round_to=0)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["resnet_bottleneck", "concat", "transformer", "vit", "glu", "dynamic"])
def test_save_load_replays_the_removal(name, tmp_path):
    model, x = zoo.build(name)
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    tp.prune(model, sparsity=0.3, granularity="channel", example_inputs=x)  # two steps
    tp.prune(model, sparsity=0.5)  # then weight masks on the smaller model
    path = tmp_path / "pruned.pt"
    tp.save(model, path)
    fresh, _ = zoo.build(name, seed=1)
    loaded = tp.load(path, fresh)
    assert loaded is fresh and params(fresh) == params(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x), model(*x))
    assert set(tp.masks(fresh)) == set(tp.masks(model))
    torch.load(path, weights_only=True)  # plain data only


def test_load_checks_before_changing(tmp_path):
    model, x = zoo.build("vgg")
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    tp.save(model, tmp_path / "p.pt")
    other, _ = zoo.build("mlp")
    before = snapshot(other)
    with pytest.raises(ValueError, match="does not match"):
        tp.load(tmp_path / "p.pt", other)
    assert_unchanged(other, before)
    with pytest.raises(ValueError, match="fresh"):
        tp.load(tmp_path / "p.pt", model)


def test_combined_channels_then_masks_then_sparsify():
    model, x = zoo.build("vgg")
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    tp.prune(model, sparsity=0.8)
    with torch.no_grad():
        y = model(*x)
        before = copy.deepcopy(model)
        sparse = tp.sparsify(model)
        assert sparse(*x).shape == y.shape
        assert_same_function(sparse, before, *x)


class AttentionNet(nn.Module):
    """A residual stream through nn.MultiheadAttention with no LayerNorm: width pruning is exact."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h)[0]
        return self.out(torch.relu(h))


def test_attention_width_removal_equals_zeroing():
    torch.manual_seed(0)
    model, x = AttentionNet().eval(), (torch.randn(2, 5, 6),)
    graph = DependencyGraph(model, x)
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    assert ("attn", "in_proj_weight", 1) in removed and ("attn.out_proj", "weight", 0) in removed
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert pruned.attn.embed_dim == 8 and pruned.attn.num_heads == 4
    assert pruned.attn.head_dim == pruned.attn.v_head_dim == 2 and pruned.attn.scale == 0.5  # 1/sqrt(4) kept
    with torch.no_grad():
        assert_same_function(pruned, masked, *x)


@pytest.mark.parametrize("qk_drop, v_drop", [([0, 3], []), ([], [1]), ([2], [0, 1, 3])])
def test_head_dims_of_q_k_and_v_shrink_apart(qk_drop, v_drop, tmp_path):
    """q/k and v positions are separate groups: removing different numbers of each keeps the
    module exact (same outputs and attention weights as zeroing), traceable, and replayable."""
    torch.manual_seed(0)
    model, x = AttentionNet().eval(), (torch.randn(2, 5, 6),)
    graph = DependencyGraph(model, x)
    inner = [g for g in graph.groups if ("attn", "in_proj_weight", 0) in g.indices]
    qk, v = sorted(inner, key=lambda g: ("attn.out_proj", "weight", 1) in g.indices)
    removed = {}
    for group, drop in ((qk, qk_drop), (v, v_drop)):
        for member, indices in group.indices.items():
            if drop:
                removed.setdefault(member, []).append(indices[drop].flatten())
    removed = {m: torch.cat(parts) for m, parts in removed.items()}
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert (pruned.attn.head_dim, pruned.attn.v_head_dim) == (4 - len(qk_drop), 4 - len(v_drop))
    h = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_same_function(pruned, masked, *x)
        assert_same_function(pruned.attn, masked.attn, h, h, h, average_attn_weights=False)
        torch.testing.assert_close(torch.jit.trace(pruned, x)(*x), pruned(*x))
    # heads can still be removed afterwards: same as zeroing them
    from torchprune.structured.heads import remove_heads, zero_heads

    masked_heads, fewer = copy.deepcopy(pruned), copy.deepcopy(pruned)
    zero_heads(masked_heads, "attn", [1, 2])
    remove_heads(fewer, "attn", [0, 3])
    with torch.no_grad():
        assert_same_function(fewer, masked_heads, *x)


def test_masks_first_then_channels():
    model, x = zoo.build("resnet_basic")
    tp.prune(model, sparsity=0.5)  # weight masks on the full model
    masks_before = {n: int(m.sum()) for n, m in tp.masks(model).items()}
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    assert params(model) < 11122 / 2
    for name, mask in tp.masks(model).items():  # masks were sliced with their weights
        layer = model.get_submodule(name)
        assert mask.shape == layer.weight.shape and bool((layer.weight[~mask] == 0).all())
        assert int(mask.sum()) <= masks_before[name]
    with torch.no_grad():
        model(*x)


class Decoder(nn.Module):
    """ConvTranspose2d, Conv1d over a flattened map, GroupNorm (inexact) and a chunk-free gate."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.gn = nn.GroupNorm(2, 6)
        self.seq = nn.Conv1d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = self.gn(self.up(torch.relu(self.bn(self.enc(x)))))
        return self.fc(self.seq(y.flatten(2)).mean(-1))


def test_conv_transpose_and_conv1d():
    torch.manual_seed(0)
    model, x = Decoder().eval(), (torch.randn(2, 3, 8, 8),)
    zoo.randomize_norms(model)
    graph = DependencyGraph(model, x)
    assert (next(g for g in graph.groups if ("enc", "weight", 0) in g.indices).indices.keys()
            >= {("up", "weight", 0), ("bn", "weight", 0)})
    norm_group = next(g for g in graph.groups if ("up", "weight", 1) in g.indices)
    assert norm_group.prunable and not norm_group.exact  # GroupNorm: channel j of each group, inexact
    removed = choose_removal(model, graph, 0.5, resolve("l2"), only_exact=True)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, removed)
    apply_plan(pruned, plan_from_removed(pruned, removed))
    assert pruned.up.in_channels == 4 and pruned.seq.out_channels == 2  # floor(0.5 * 5) kept
    with torch.no_grad():
        assert_same_function(pruned, masked, *x)


@pytest.mark.parametrize("sparsity, kept", [(0.5, (16, 16)), (0.7, (8, 8)), (0.9, (8, 8))])
def test_round_to_through_prune(sparsity, kept):
    # fc1 has 32 outputs, fc2 24: floor((1 - s) * n) kept, then rounded to the nearest multiple of 8
    # (halves up, at least 8): 0.5 -> 16, 12 -> 16, 16; 0.7 -> 9, 7 -> 8, 8; 0.9 -> 3, 2 -> 8, 8
    model, x = zoo.build("mlp")
    tp.prune(model, sparsity=sparsity, granularity="channel", example_inputs=x, round_to=8)
    assert (model.fc1.out_features, model.fc2.out_features) == kept
    with torch.no_grad():
        model(*x)


def test_round_to_larger_than_a_group_keeps_it_whole_and_global_scope_rounds():
    model, x = zoo.build("mlp")
    tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x, round_to=64)
    assert (model.fc1.out_features, model.fc2.out_features) == (32, 24)
    model, x = zoo.build("resnet_basic")
    tp.prune(model, sparsity=0.5, granularity="channel", scope="global", example_inputs=x, round_to=4)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.out_channels != 10:
            assert m.out_channels % 4 == 0, m


@pytest.mark.parametrize("kwargs, error", [
    (dict(granularity="weight", sparsity=0.5, round_to=8), ValueError),
    (dict(granularity="2:4", round_to=8), ValueError),
    (dict(granularity="head", sparsity=0.5, round_to=8), ValueError),
    (dict(granularity="layer", sparsity=0.5, round_to=2), ValueError),
    (dict(granularity="channel", sparsity=0.5, round_to=0), ValueError),
    (dict(granularity="channel", sparsity=0.5, round_to=-8), ValueError),
    (dict(granularity="channel", sparsity=0.5, round_to=8.0), TypeError),
    (dict(granularity="channel", sparsity=0.5, round_to=True), TypeError),
])
def test_round_to_errors_change_nothing(kwargs, error):
    model, x = zoo.build("mlp")
    before = snapshot(model)
    with pytest.raises(error, match="round_to"):
        tp.prune(model, example_inputs=x, **kwargs)
    assert_unchanged(model, before)


def test_the_saved_plan_format_is_unchanged(tmp_path):
    """The steps tp.save stores are the plain data older versions wrote, and a file written in that
    format (a hand-made one here) replays on a fresh instance."""
    torch.manual_seed(0)

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

    model, x = fresh(), torch.randn(3, 4)
    tp.prune(model, sparsity=0.5, granularity="channel", importance="l2", example_inputs=x)
    (step,) = model._torchprune_structure
    assert step["kind"] == "channels" and set(step) == {"kind", "keep"}
    assert all(type(m) is str and type(t) is str and type(d) is int and all(type(i) is int for i in keep)
               for m, t, d, keep in step["keep"])
    kept = step["keep"][0][3]
    old = [{"kind": "channels", "keep": [["0", "weight", 0, kept], ["0", "bias", 0, kept], ["2", "weight", 1, kept]]}]
    assert (sorted(map(tuple, ((m, t, d) for m, t, d, _ in step["keep"])))
            == sorted((m, t, d) for m, t, d, _ in old[0]["keep"]))
    tp.save(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["structure"] = old
    torch.save(payload, tmp_path / "old.pt")
    restored = fresh()
    tp.load(tmp_path / "old.pt", restored)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
    assert restored._torchprune_structure == old
