"""``exclude`` and ``freeze`` in structural pruning (structured/exclusion.py): an excluded layer keeps
the channels it makes while the channels it reads still go with their producer; a frozen layer is
left unchanged (every group it is in stays whole); the same rule for heads and blocks; freeze is
refused where it means nothing; the warning names no layer kept by either."""

import copy
import warnings

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.importance import resolve
from torchprune.layer_types import is_input_member
from torchprune.schedules import OneShot
from torchprune.structured import DependencyGraph
from torchprune.structured.channels import choose_removal
from torchprune.structured.exclusion import exclusion
from torchprune.structured.heads import attention_modules
from torchprune.structured.plan import zero_channels

import zoo
from conftest import ViewNet, assert_unchanged, snapshot
from error_bounds import assert_same_function


class Classifier(nn.Module):
    """conv1-bn1 -> conv2-bn2 (the penultimate layer) -> global pool -> fc (10 classes)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class UpNet(nn.Module):
    """A transposed conv in the middle: its weight reads its input channels along dim 0."""

    def __init__(self):
        super().__init__()
        self.down, self.up, self.out = nn.Conv2d(3, 8, 3, 2, 1), nn.ConvTranspose2d(8, 6, 2, 2), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.up(torch.relu(self.down(x)))))


def classifier():
    torch.manual_seed(0)
    model = Classifier().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model, (torch.randn(2, 3, 8, 8),)


def prune_and_compare(model, x, **kwargs):
    """tp.prune(model, 0.5, "channel", **kwargs) on ``model``; checks that it computes what zeroing
    the same channels (chosen under the same exclude/freeze) computes, and returns it."""
    kept = exclusion(model, kwargs.get("exclude", ()), kwargs.get("freeze", ()))
    removed = choose_removal(model, DependencyGraph(model, x), 0.5, resolve("l2"), kept=kept)
    masked = copy.deepcopy(model)
    zero_channels(masked, removed)
    tp.prune(model, sparsity=0.5, granularity="channel", importance="l2", example_inputs=x, **kwargs)
    assert_same_function(model, masked, *x)
    return model


@pytest.mark.parametrize("form", ["name", "module", "type"])
def test_excluding_the_classifier_keeps_the_classes_and_prunes_the_penultimate_layer(form):
    model, x = classifier()
    fc = model.fc
    exclude = {"name": ["fc"], "module": [model.fc], "type": [nn.Linear]}[form]
    prune_and_compare(model, x, exclude=exclude)
    assert model.fc is fc and fc.out_features == 10 and fc.bias.shape == (10,)
    assert model.conv2.out_channels == model.bn2.num_features == fc.in_features == 8  # with fc's columns
    assert fc.weight.shape == (10, 8)
    assert model.conv1.out_channels == 4


def test_freezing_the_classifier_keeps_the_penultimate_layer_whole():
    model, x = classifier()
    fc_before = {k: v.clone() for k, v in model.fc.state_dict().items()}
    prune_and_compare(model, x, freeze=["fc"])
    assert model.conv2.out_channels == model.bn2.num_features == 16
    for key, value in model.fc.state_dict().items():
        assert torch.equal(value, fc_before[key]), key
    assert model.conv1.out_channels == model.conv2.in_channels == 4  # groups without fc still go


@pytest.mark.parametrize("name", ["bn1", "bn2"])
def test_an_excluded_batchnorm_keeps_its_channels(name):
    model, x = classifier()
    prune_and_compare(model, x, exclude=[name])
    bn = model.get_submodule(name)
    assert bn.num_features == (8 if name == "bn1" else 16)
    other = model.bn2 if name == "bn1" else model.bn1
    assert other.num_features == (8 if name == "bn1" else 4)


def test_excluding_a_layer_in_the_middle_keeps_its_outputs_and_prunes_its_inputs():
    model, x = classifier()
    prune_and_compare(model, x, exclude=["conv2"])
    assert model.conv2.out_channels == model.bn2.num_features == model.fc.in_features == 16
    assert model.conv1.out_channels == model.conv2.in_channels == 4
    model, x = zoo.build("vgg")  # a flatten into the excluded Linear: each channel's 16 features go
    prune_and_compare(model, x, exclude=["classifier.0"])
    assert model.classifier[0].out_features == 32 and model.classifier[3].in_features == 32
    assert model.features[7].out_channels == 8 and model.classifier[0].in_features == 8 * 16
    model, x = zoo.build("vgg")
    prune_and_compare(model, x, freeze=["classifier.0"])
    assert model.classifier[0].weight.shape == (32, 16 * 16) and model.features[7].out_channels == 16


def test_a_transposed_conv_reads_its_inputs_along_weight_dim_0():
    assert is_input_member(nn.ConvTranspose2d(8, 6, 2), "weight", 0)
    assert not is_input_member(nn.ConvTranspose2d(8, 6, 2), "weight", 1)
    assert is_input_member(nn.Linear(4, 2), "weight", 1) and not is_input_member(nn.Linear(4, 2), "weight", 0)
    assert not is_input_member(nn.BatchNorm2d(4), "weight", 0)
    torch.manual_seed(0)
    model, x = UpNet().eval(), (torch.randn(2, 3, 8, 8),)
    prune_and_compare(model, x, exclude=["up"])
    assert model.up.out_channels == model.out.in_channels == 6
    assert model.up.in_channels == model.down.out_channels == 4


def test_excluding_a_container_keeps_every_layer_in_it():
    model, x = zoo.build("vgg")
    prune_and_compare(model, x, exclude=["features"])
    assert [model.features[i].out_channels for i in (0, 3, 7)] == [8, 16, 16]
    assert model.classifier[0].out_features == 16 and model.classifier[0].in_features == 16 * 16


def test_the_channel_pruner_follows_exclude_and_freeze():
    for kwargs, penultimate in [(dict(exclude=["fc"]), 8), (dict(freeze=["fc"]), 16)]:
        model, x = classifier()
        reference = copy.deepcopy(model)
        pruner = tp.Pruner(model, 0.5, OneShot(at=0), granularity="channel", example_inputs=x, **kwargs)
        touches_fc = [g for g in pruner.groups.values() if any(m == "fc" for m, _, _ in g.indices)]
        assert [set(g.indices) for g in touches_fc] == ([{("conv2", "weight", 0), ("conv2", "bias", 0),
                                                           ("bn2", "weight", 0), ("bn2", "bias", 0),
                                                           ("bn2", "running_mean", 0), ("bn2", "running_var", 0),
                                                           ("fc", "weight", 1)}] if "exclude" in kwargs else [])
        pruner.step()
        masked = copy.deepcopy(model)
        pruner.finalize()
        assert model.fc.out_features == 10 and model.conv2.out_channels == model.fc.in_features == penultimate
        assert_same_function(model, masked, *x)
        tp.prune(reference, sparsity=0.5, granularity="channel", example_inputs=x, **kwargs)
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("call", ["prune", "Pruner"])
@pytest.mark.parametrize("granularity", ["weight", "2:4"])
def test_freeze_is_refused_with_masks(call, granularity):
    model, _ = classifier()
    before = snapshot(model)
    with pytest.raises(ValueError, match="`freeze` applies to structural pruning.*use `exclude`"):
        if call == "prune":
            tp.prune(model, sparsity=0.5, granularity=granularity, freeze=["fc"])
        else:
            tp.Pruner(model, 0.5, OneShot(at=0), granularity=granularity, freeze="fc")
    assert_unchanged(model, before)
    tp.prune(model, sparsity=0.5, freeze=[])  # nothing frozen: nothing to refuse


@pytest.mark.parametrize("freeze,error,message", [
    (["nope"], ValueError, "`freeze` names no module of the model: 'nope'"),
    ([nn.Linear(2, 2)], ValueError, "`freeze` holds a Linear that is not part of the model"),
    (3, TypeError, "`freeze` must be module names"),
    ([3], TypeError, "`freeze` items must be"),
])
@pytest.mark.parametrize("granularity", ["channel", "head", "layer", "Pruner"])
def test_freeze_names_are_checked_before_anything_changes(freeze, error, message, granularity):
    model, x = classifier()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        if granularity == "Pruner":
            tp.Pruner(model, 0.5, OneShot(at=0), granularity="channel", example_inputs=x, freeze=freeze)
        else:
            tp.prune(model, sparsity=0.5, granularity=granularity, example_inputs=x, freeze=freeze)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name,projection,out_projection", [("transformer", "qkv", "proj"),
                                                            ("vit", None, "out_proj")])
def test_heads_follow_the_same_rule(name, projection, out_projection):
    """Excluding an attention module or its q/k/v projection keeps its heads; excluding only its
    out-projection (whose outputs heads do not change) does not; freezing any of them does."""
    attn = "blocks.0.attn"
    cases = [(dict(exclude=[attn]), 4), (dict(exclude=[f"{attn}.{out_projection}"]), 2),
             (dict(freeze=[attn]), 4), (dict(freeze=[f"{attn}.{out_projection}"]), 4)]
    if projection is not None:
        cases += [(dict(exclude=[f"{attn}.{projection}"]), 4), (dict(freeze=[f"{attn}.{projection}"]), 4)]
    for kwargs, heads in cases:
        model, x = zoo.build(name)
        width = model.get_submodule(f"{attn}.{out_projection}").out_features
        tp.prune(model, sparsity=0.5, granularity="head", example_inputs=x, **kwargs)
        found = attention_modules(model)
        assert found[attn].num_heads == heads and found["blocks.1.attn"].num_heads == 2, kwargs
        assert model.get_submodule(f"{attn}.{out_projection}").out_features == width


def test_a_block_holding_a_frozen_module_is_not_removed():
    model, x = zoo.build("resnet_basic")
    tp.prune(model, sparsity=0.99, granularity="layer", example_inputs=x, freeze=["layers.1.conv1"])
    assert sorted(model._torchprune_structure[-1]["replaced"]) == ["layers.0", "layers.3"]
    assert isinstance(model.layers[1].conv1, nn.Conv2d)
    model, x = zoo.build("resnet_basic")
    tp.prune(model, sparsity=0.99, granularity="layer", example_inputs=x, exclude=["layers.1"])
    assert sorted(model._torchprune_structure[-1]["replaced"]) == ["layers.0", "layers.3"]


def test_the_warning_names_no_group_that_exclude_or_freeze_keeps():
    x = torch.randn(2, 3, 4, 4)
    # fc's inputs would go with conv2's outputs (fc excluded, not frozen): the view keeps them, said
    with pytest.warns(UserWarning, match=r"kept conv2, fc: view with a fixed size"):
        tp.prune(ViewNet(), sparsity=0.5, granularity="channel", example_inputs=x, exclude=["fc"])
    for kwargs in (dict(exclude=["conv2"]), dict(freeze=["fc"]), dict(freeze=["conv2"])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the only group the view keeps is kept by the user anyway
            tp.prune(ViewNet(), sparsity=0.5, granularity="channel", example_inputs=x, **kwargs)
