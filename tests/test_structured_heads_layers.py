"""granularity="head" and "layer": exactness against zeroing, attributes, save/load replay."""

import copy
import io

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.nn.attention import PrunedMultiheadAttention
from torchprune.structured.heads import attention_modules, remove_heads, zero_heads

import zoo
from error_bounds import assert_same_function


@pytest.mark.parametrize("name", ["vit", "transformer"])
def test_removing_heads_equals_zeroing_them(name):
    model, x = zoo.build(name)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    for attn in attention_modules(model):
        zero_heads(masked, attn, [1, 3])
        remove_heads(pruned, attn, [0, 2])
    with torch.no_grad():
        assert_same_function(pruned, masked, *x)
    assert all(m.num_heads == 2 for m in attention_modules(pruned).values())


def test_pruned_mha_matches_nn_mha_with_masks_and_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    attn_mask = torch.zeros(5, 7, dtype=torch.bool)
    attn_mask[0, 3] = True
    full = PrunedMultiheadAttention.from_attention(mha, torch.arange(4)).eval()
    for kwargs in [{}, {"key_padding_mask": pad}, {"attn_mask": attn_mask, "average_attn_weights": False}]:
        assert_same_function(full, mha, q, kv, kv, **kwargs)


def test_pruned_mha_pickled_before_v_head_dim_and_scale_still_loads():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    old = PrunedMultiheadAttention.from_attention(mha, torch.arange(4))
    del old.__dict__["v_head_dim"], old.__dict__["scale"]
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert restored.v_head_dim == 4 and restored.scale == pytest.approx(0.5)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_same_function(restored, mha, x, x, x)


@pytest.mark.parametrize("name", ["vit", "transformer"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_heads(name, scope, tmp_path):
    model, x = zoo.build(name)
    before = sum(p.numel() for p in model.parameters())
    tp.prune(model, sparsity=0.5, granularity="head", scope=scope, example_inputs=x)
    heads = [m.num_heads for m in attention_modules(model).values()]
    assert sum(heads) == 4 and min(heads) >= 1
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        y = model(*x)
    torch.jit.trace(model, x, check_trace=False)
    tp.save(model, tmp_path / "h.pt")
    fresh, _ = zoo.build(name, seed=3)
    tp.load(tmp_path / "h.pt", fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x), y)


def test_unverifiable_hand_written_attention_is_left_whole():
    class Hardcoded(zoo.QKVAttention):
        def forward(self, x):
            B, N = x.shape[0], x.shape[1]
            qkv = self.qkv(x).reshape(B, N, 3, 4, 4).permute(2, 0, 3, 1, 4)  # heads hard-coded
            q, k, v = qkv.unbind(0)
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))

    model = nn.Sequential(nn.Linear(16, 16), Hardcoded(16, 4))
    with pytest.warns(UserWarning, match="left whole"):
        tp.prune(model, sparsity=0.5, granularity="head", example_inputs=torch.randn(2, 5, 16))
    assert model[1].num_heads == 4 and model[1].qkv.out_features == 48


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv2", "vit"])
def test_prune_layers_replaces_least_sensitive_blocks(name, tmp_path):
    model, x = zoo.build(name)
    reference = copy.deepcopy(model)
    tp.prune(model, sparsity=0.5, granularity="layer", example_inputs=x)
    replaced = model._torchprune_structure[-1]["replaced"]
    assert replaced and all(isinstance(model.get_submodule(n), nn.Identity) for n in replaced)
    for n in replaced:  # the same model built by hand
        parent, _, attr = n.rpartition(".")
        setattr(reference.get_submodule(parent), attr, nn.Identity())
    with torch.no_grad():
        torch.testing.assert_close(model(*x), reference(*x))
    tp.save(model, tmp_path / "l.pt")
    fresh, _ = zoo.build(name, seed=2)
    tp.load(tmp_path / "l.pt", fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x), model(*x))


def test_layer_without_residual_blocks_is_an_error():
    model, x = zoo.build("vgg")
    with pytest.raises(ValueError, match="no residual block"):
        tp.prune(model, sparsity=0.5, granularity="layer", example_inputs=x)


def test_layer_scope_head_count_follows_the_channel_rule():
    """scope="layer" keeps floor((1 - sparsity) * heads), at least one, as for channels (select.py):
    8 heads at 0.3 keep 5 (before the selection was shared, heads kept round-half-up's 6)."""
    from torchprune.structured.select import kept_counts

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 8, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    for sparsity, kept in [(0.3, 5), (0.5, 4), (0.125, 7), (0.99, 1)]:
        net = Net()
        tp.prune(net, sparsity=sparsity, granularity="head", scope="layer", example_inputs=torch.randn(2, 5, 16))
        assert net.attn.num_heads == kept
        assert kept_counts([range(8)], [torch.zeros(8)], sparsity, "layer") == [kept]
