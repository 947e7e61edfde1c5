"""granularity="head" on transformers' attention layouts (issue 15): LLaMA's grouped-query
attention (q/k/v/o_proj, head_dim, num_key_value_groups) loses whole key/value heads with their
query groups, so the groups stay consistent, and its config takes the new head counts (and writes
head_dim out) so from_pretrained reloads it; BERT's attention (self.query/key/value,
output.dense) loses heads too, and its config, which derives the head size from hidden_size,
cannot say so: a warning points to tp.save / tp.load. Stand-ins run without transformers."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune.structured.heads import attention_modules, remove_heads, units, zero_heads

from error_bounds import assert_same_function

WIDTH, HEAD_DIM = 32, 4


class GroupedQueryAttention(nn.Module):
    """LLaMA's attention layout: heads shaped with -1 and head_dim, key/value heads repeated
    num_key_value_groups times."""

    def __init__(self, heads=8, kv_heads=4):
        super().__init__()
        self.head_dim, self.num_key_value_groups = HEAD_DIM, heads // kv_heads
        self.q_proj = nn.Linear(WIDTH, heads * HEAD_DIM)
        self.k_proj, self.v_proj = nn.Linear(WIDTH, kv_heads * HEAD_DIM), nn.Linear(WIDTH, kv_heads * HEAD_DIM)
        self.o_proj = nn.Linear(heads * HEAD_DIM, WIDTH, bias=False)

    def forward(self, x):
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.o_proj(out.reshape(*x.shape[:-1], -1))


class BertSelf(nn.Module):
    def __init__(self, heads=4):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, HEAD_DIM
        self.all_head_size = heads * HEAD_DIM
        self.query, self.key, self.value = (nn.Linear(WIDTH, heads * HEAD_DIM) for _ in range(3))

    def forward(self, x):
        shape = (*x.shape[:-1], -1, self.attention_head_size)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(*x.shape[:-1], -1)


class BertAttention(nn.Module):
    def __init__(self, heads=4):
        super().__init__()
        self.self, self.output = BertSelf(heads), nn.Module()
        self.output.dense = nn.Linear(heads * HEAD_DIM, WIDTH)

    def forward(self, x):
        return self.output.dense(self.self(x))


class Decoder(nn.Module):
    """Two layers named like LLaMA's (layers.N.self_attn) or BERT's (encoder.layer.N.attention)."""

    def __init__(self, kind="llama"):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(5, WIDTH)
        if kind == "llama":
            self.config = types.SimpleNamespace(model_type="llama", num_attention_heads=8, num_key_value_heads=4)
            self.layers = nn.ModuleList(nn.Module() for _ in range(2))
            for layer in self.layers:
                layer.self_attn = GroupedQueryAttention()
            self.blocks = [layer.self_attn for layer in self.layers]
        else:
            self.config = types.SimpleNamespace(model_type="bert", num_attention_heads=4)
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(nn.Module() for _ in range(2))
            for layer in self.encoder.layer:
                layer.attention = BertAttention()
            self.blocks = [layer.attention for layer in self.encoder.layer]

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return x


def tokens():
    return torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))


def test_grouped_query_attention_loses_whole_key_value_groups():
    model, x = Decoder("llama"), tokens()
    found = attention_modules(model)
    assert set(found) == {"layers.0.self_attn", "layers.1.self_attn"} and units(found["layers.0.self_attn"]) == 4
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_heads(masked, "layers.0.self_attn", [1, 3])
    remove_heads(pruned, "layers.0.self_attn", [0, 2])
    attn = pruned.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (16, 8, 16)
    assert attn.num_key_value_groups == 2
    with torch.no_grad():
        assert_same_function(pruned, masked, x)


def test_prune_heads_rewrites_a_llama_config(tmp_path):
    model, x = Decoder("llama"), tokens()
    tp.prune(model, 0.5, granularity="head", example_inputs=x)
    assert [b.k_proj.out_features for b in model.blocks] == [8, 8]
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (4, 2, 4)
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", Decoder("llama"))
    assert (fresh.config.num_attention_heads, fresh.config.num_key_value_heads) == (4, 2)
    torch.testing.assert_close(fresh(x), model(x))


def test_bert_attention_heads_and_the_config_warning(tmp_path):
    model, x = Decoder("bert"), tokens()
    with pytest.warns(UserWarning, match="derives the head size from hidden_size"):
        tp.prune(model, 0.5, granularity="head", example_inputs=x)
    inner = model.blocks[0].self
    assert (inner.num_attention_heads, inner.all_head_size, inner.query.out_features) == (2, 8, 8)
    assert model.config.num_attention_heads == 4  # left: it cannot say 2 heads of 4
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", Decoder("bert"))
    torch.testing.assert_close(fresh(x), model(x))


def _transformers_model(name):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=128, vocab_size=100,
                  max_position_embeddings=32)
    if name == "llama":
        return transformers.LlamaModel, transformers.LlamaConfig(num_key_value_heads=4, **common)
    if name == "qwen2":
        return transformers.Qwen2Model, transformers.Qwen2Config(num_key_value_heads=2, **common)
    return transformers.BertModel, transformers.BertConfig(**common)


@pytest.mark.parametrize("name", ["llama", "qwen2", "bert"])
def test_transformers_heads_prune_and_reload(name, tmp_path):
    cls, config = _transformers_model(name)
    torch.manual_seed(0)
    model = cls(copy.deepcopy(config)).eval()
    x = torch.randint(0, 100, (1, 16))
    if name == "bert":
        with pytest.warns(UserWarning, match="derives the head size"):
            tp.prune(model, 0.5, granularity="head", example_inputs=x)
        assert model.encoder.layer[0].attention.self.num_attention_heads == 4
        tp.save(model, tmp_path / "pruned.pt")
        reloaded = tp.load(tmp_path / "pruned.pt", cls(copy.deepcopy(config))).eval()
    else:
        tp.prune(model, 0.5, granularity="head", example_inputs=x)
        assert model.config.num_attention_heads == 4 and model.config.head_dim == 8
        assert model.config.num_key_value_heads == config.num_key_value_heads // 2
        model.save_pretrained(tmp_path)
        reloaded = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).last_hidden_state, model(x).last_hidden_state)
