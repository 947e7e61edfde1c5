"""register_attention: a hand-written attention class whose parts are named otherwise than timm's
(here lucidrains-style ``to_qkv``/``to_out``, ``heads``, ``dim_head``, ``inner_dim``) is declared
once; then granularity "head" removes its heads and "channel" shrinks its head size, with its
attributes rewritten and removal equal to zeroing, and tp.load replays both. An undeclared twin
class is left whole."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune.structured import AttentionNames, register_attention
from torchprune.structured.head_dims import zero_head_dims
from torchprune.structured.heads import zero_heads
from torchprune.structured.plan import steps_of

from error_bounds import assert_same_function

WIDTH, HEADS, DIM_HEAD = 16, 4, 8


def attention_class(name):
    """A lucidrains-style attention class; two calls give two unrelated classes with one body."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads, self.dim_head = HEADS, DIM_HEAD
            self.inner_dim = HEADS * DIM_HEAD
            self.to_qkv, self.to_out = nn.Linear(WIDTH, 3 * self.inner_dim), nn.Linear(self.inner_dim, WIDTH)

        def forward(self, x):
            b, n = x.shape[0], x.shape[1]
            q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.inner_dim)
            return self.to_out(out)

    Attention.__name__ = Attention.__qualname__ = name
    return Attention


NamedAttention, Undeclared = attention_class("NamedAttention"), attention_class("Undeclared")
register_attention(NamedAttention, qkv="to_qkv", proj="to_out", num_heads="heads", head_dim="dim_head",
                   widths=("inner_dim",))


class Net(nn.Module):
    def __init__(self, attention=NamedAttention):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.attn, self.head = nn.Linear(5, WIDTH), attention(), nn.Linear(WIDTH, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.attn(h))


def tokens():
    return torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_heads_of_a_declared_class_go_and_its_attributes_follow(tmp_path):
    model, x = Net().double(), tokens()
    reference = copy.deepcopy(model)
    tp.prune(model, 0.5, granularity="head", example_inputs=x)
    attn = model.attn
    assert (attn.heads, attn.dim_head, attn.inner_dim) == (2, DIM_HEAD, 2 * DIM_HEAD)
    assert attn.to_qkv.weight.shape == (6 * DIM_HEAD, WIDTH) and attn.to_out.weight.shape == (WIDTH, 2 * DIM_HEAD)
    kept = steps_of(model)[0]["keep"]
    zero_heads(reference, "attn", [h for h in range(HEADS) if h not in kept])
    assert_same_function(model, reference, x)
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", Net().double())
    assert (fresh.attn.heads, fresh.attn.inner_dim) == (2, 2 * DIM_HEAD)
    assert_same_function(fresh, model, x)


def test_channel_pruning_shrinks_a_declared_class_head_size(tmp_path):
    model, x = Net().double(), tokens()
    reference = copy.deepcopy(model)
    tp.prune(model, 0.5, granularity="channel", example_inputs=x, freeze=["embed"])  # only the head size
    attn = model.attn
    assert (attn.heads, attn.dim_head, attn.inner_dim) == (HEADS, DIM_HEAD // 2, HEADS * DIM_HEAD // 2)
    assert not hasattr(attn, "scale")  # no explicit scale: q's rows carry the old 1/sqrt(8) instead
    (step,) = [s for s in steps_of(model) if s["kind"] == "head_dims"]
    assert step["module"] == "attn" and step["scale"] is not None
    zero_head_dims(reference.attn, step["qk"], step["v"])
    assert_same_function(model, reference, x)
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", Net().double())
    assert (fresh.attn.dim_head, fresh.attn.inner_dim) == (DIM_HEAD // 2, HEADS * DIM_HEAD // 2)
    assert_same_function(fresh, model, x)


def test_an_undeclared_class_is_left_whole():
    model, x = Net(Undeclared).double(), tokens()
    with pytest.raises(ValueError, match="no attention module whose heads can be pruned"):
        tp.prune(model, 0.5, granularity="head", example_inputs=x)
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert (model.attn.heads, model.attn.dim_head) == (HEADS, DIM_HEAD)
    assert not [s for s in steps_of(model) if s["kind"] == "head_dims"]


def test_bad_declarations_name_the_argument():
    with pytest.raises(TypeError, match="`cls` must be a subclass of torch.nn.Module"):
        register_attention(int)
    with pytest.raises(TypeError, match="`qkv` must be an attribute name"):
        register_attention(Undeclared, qkv=3)
    with pytest.raises(TypeError, match="`head_dim` must be an attribute name"):
        register_attention(Undeclared, head_dim="not a name")
    with pytest.raises(TypeError, match="`widths` must be a sequence of attribute names"):
        register_attention(Undeclared, widths="inner_dim")
    assert register_attention(NamedAttention, qkv="to_qkv", proj="to_out", num_heads="heads", head_dim="dim_head",
                              widths=("inner_dim",)) == AttentionNames("to_qkv", "to_out", "heads", "dim_head",
                                                                       ("inner_dim",))
