"""granularity="head" on T5's attention (issue 15): a stack's first layer turns relative positions
into a bias with one row per head (its ``relative_attention_bias`` Embedding has one column per
head) and hands that bias to every later layer, so the layers of a stack are tied: they lose the
same heads, chosen by their joint score, and the Embedding loses those columns. T5's config holds
the head count apart from the head size (``num_heads``, ``d_kv``), so ``save_pretrained`` +
``from_pretrained`` give the pruned model back. A stand-in runs without transformers."""

import copy

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.structured.heads import attention_modules, tied_heads, units, zero_heads

from error_bounds import assert_same_function

D_MODEL, D_KV, BUCKETS = 16, 4, 9


class T5Attention(nn.Module):
    """T5's attention in miniature: heads shaped with -1 and ``key_value_proj_dim``, no softmax
    scale, and the position bias made here (first layer) or received (later layers)."""

    def __init__(self, heads=4, has_bias=False):
        super().__init__()
        self.n_heads, self.key_value_proj_dim, self.inner_dim = heads, D_KV, heads * D_KV
        self.q, self.k, self.v = (nn.Linear(D_MODEL, heads * D_KV, bias=False) for _ in range(3))
        self.o = nn.Linear(heads * D_KV, D_MODEL, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(BUCKETS, heads)

    def forward(self, x, position_bias=None):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.key_value_proj_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if position_bias is None:
            if hasattr(self, "relative_attention_bias"):
                distance = torch.arange(t)[None, :] - torch.arange(t)[:, None]
                buckets = distance.clamp(-(BUCKETS // 2), BUCKETS // 2) + BUCKETS // 2
                position_bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None]
            else:
                position_bias = torch.zeros(1, self.n_heads, t, t)
        weights = torch.softmax(q @ k.transpose(-1, -2) + position_bias, dim=-1)
        return self.o((weights @ v).transpose(1, 2).reshape(b, t, -1)), position_bias


class Block(nn.Module):
    def __init__(self, heads, first):
        super().__init__()
        self.attention = T5Attention(heads, has_bias=first)
        self.ff = nn.Sequential(nn.Linear(D_MODEL, 32), nn.ReLU(), nn.Linear(32, D_MODEL))

    def forward(self, x, position_bias=None):
        out, position_bias = self.attention(x, position_bias)
        x = x + out
        return x + self.ff(x), position_bias


class Stack(nn.Module):
    def __init__(self, depth=3, heads=4):
        super().__init__()
        self.block = nn.ModuleList(Block(heads, first=i == 0) for i in range(depth))

    def forward(self, x):
        position_bias = None
        for block in self.block:
            x, position_bias = block(x, position_bias)
        return x


def stack(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Stack(**kwargs).eval(), torch.randn(2, 6, D_MODEL)


def test_the_layers_of_a_stack_are_tied():
    model, _ = stack()
    found = attention_modules(model)
    assert sorted(found) == [f"block.{i}.attention" for i in range(3)]
    assert tied_heads(found) == [[f"block.{i}.attention" for i in range(3)]]
    assert units(found["block.0.attention"]) == 4


def test_tied_heads_go_from_every_layer_like_zeroing():
    model, x = stack()
    masked = copy.deepcopy(model)
    tp.prune(model, 0.5, granularity="head", example_inputs=x)
    kept = [b.attention.n_heads for b in model.block]
    assert kept == [2, 2, 2]
    assert [b.attention.inner_dim for b in model.block] == [8, 8, 8]
    assert model.block[0].attention.relative_attention_bias.weight.shape == (BUCKETS, 2)
    assert model.block[0].attention.relative_attention_bias.embedding_dim == 2
    removed = [h for h in range(4) if not _kept(masked, model, h)]
    assert len(removed) == 2
    for i in range(3):
        zero_heads(masked, f"block.{i}.attention", removed)
    with torch.no_grad():
        assert_same_function(model, masked, x)
        assert_same_function(model, masked, torch.randn(3, 9, D_MODEL))  # another length: the bias follows


def _kept(dense, pruned, head):
    """Whether ``head`` of the dense stack's first layer is among the pruned one's q rows."""
    rows = dense.block[0].attention.q.weight[head * D_KV:(head + 1) * D_KV]
    return any(torch.equal(rows, pruned.block[0].attention.q.weight[i * D_KV:(i + 1) * D_KV]) for i in range(2))


def test_the_joint_score_picks_the_heads():
    """Head 1 is the weakest of layer 0 alone, head 3 of layers 1 and 2; every layer loses head 3
    (the joint score: the mean of the layers' normalized scores)."""
    model, x = stack()
    with torch.no_grad():
        for i, block in enumerate(model.block):
            for p in (block.attention.q, block.attention.k, block.attention.v, block.attention.o):
                p.weight.fill_(1.0)
            weak = [1] if i == 0 else [3]
            for h in weak:
                scale = 0.5 if i == 0 else 0.1
                for p in (block.attention.q, block.attention.k, block.attention.v):
                    p.weight[h * D_KV:(h + 1) * D_KV] *= scale
                block.attention.o.weight[:, h * D_KV:(h + 1) * D_KV] *= scale
    dense = copy.deepcopy(model)
    tp.prune(model, 0.25, granularity="head", importance="l1", example_inputs=x)
    assert [b.attention.n_heads for b in model.block] == [3, 3, 3]
    bias = dense.block[0].attention.relative_attention_bias.weight
    torch.testing.assert_close(model.block[0].attention.relative_attention_bias.weight, bias[:, [0, 1, 2]])


def test_excluding_one_layer_keeps_the_whole_tie():
    model, x = stack()
    with pytest.raises(ValueError, match="after `exclude` and `freeze`"):
        tp.prune(model, 0.5, granularity="head", example_inputs=x, exclude=[model.block[1].attention])
    assert [b.attention.n_heads for b in model.block] == [4, 4, 4]


def test_random_scores_and_save_load(tmp_path):
    model, x = stack(seed=1)
    tp.prune(model, 0.5, granularity="head", importance="random", example_inputs=x)
    assert [b.attention.n_heads for b in model.block] == [2, 2, 2]
    tp.save(model, tmp_path / "t5.pt")
    fresh = tp.load(tmp_path / "t5.pt", stack(seed=5)[0])
    assert [b.attention.n_heads for b in fresh.block] == [2, 2, 2]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


class _Hidden(nn.Module):
    """A transformers model's ``last_hidden_state`` (its output also holds a cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs).last_hidden_state


@pytest.mark.parametrize("encoder_only", [True, False], ids=["T5EncoderModel", "T5Model"])
def test_transformers_t5_heads_prune_and_reload(encoder_only, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2,
                                   num_heads=4)
    cls = transformers.T5EncoderModel if encoder_only else transformers.T5Model
    torch.manual_seed(0)
    model = cls(copy.deepcopy(config)).eval()
    ids = torch.randint(0, 100, (2, 7))
    x = (ids,) if encoder_only else (ids, None, ids[:, :5])
    masked = copy.deepcopy(model)
    tp.prune(model, 0.5, granularity="head", example_inputs=x)
    counts = {m.n_heads for m in model.modules() if hasattr(m, "n_heads")}
    assert counts == {2} and model.config.num_heads == 2 and model.config.d_kv == 8
    ties = tied_heads(attention_modules(masked))
    assert len(ties) == (1 if encoder_only else 3)  # encoder self, decoder self, decoder cross
    for tie in ties:
        first = masked.get_submodule(tie[0])
        kept = model.get_submodule(tie[0])
        drop = [h for h in range(4) if not any(torch.equal(first.q.weight[h * 8:(h + 1) * 8],
                                                           kept.q.weight[i * 8:(i + 1) * 8]) for i in range(2))]
        for name in tie:
            zero_heads(masked, name, drop)
    model.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = model(*x).last_hidden_state
        torch.testing.assert_close(reloaded(*x).last_hidden_state, out, rtol=0, atol=0)
        assert_same_function(_Hidden(model), _Hidden(masked), *x)
