"""granularity="head" on transformers' attention layouts (issue 15): LLaMA's grouped-query
attention (q/k/v/o_proj, head_dim, num_key_value_groups) loses whole key/value heads with their
query groups, so the groups stay consistent, and its config takes the new head counts (and writes
head_dim out) so from_pretrained reloads it; BERT's attention (self.query/key/value,
output.dense) loses heads too, and its config, which derives the head size from hidden_size,
cannot say so: a warning points to tp.save / tp.load. The same for the layouts with one key/value
head per query head: ViT's (q/k/v/o_proj, num_attention_heads; its config takes the new counts)
and BART's (q/k/v/out_proj, num_heads, embed_dim), and GPT-2's fused attention (a transformers
Conv1D c_attn making [q | k | v], split_size wide each, and a Conv1D c_proj); BART's and GPT-2's
configs cannot describe pruned heads and warn like BERT's. Stand-ins run without transformers."""

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune.structured.heads import attention_modules, head_members, remove_heads, units, zero_heads

from error_bounds import assert_same_function
from zoo import Conv1D

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


def _attend(x, q, k, v, head_dim, causal=False):
    """Splits q, k, v into heads of head_dim (their count from the width), attends, joins the heads."""
    shape = (*x.shape[:-1], -1, head_dim)
    q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(*x.shape[:-1], -1)


class ViTAttention(nn.Module):
    """HF ViT's layout: q/k/v/o_proj, head_dim and num_attention_heads, no num_key_value_groups."""

    def __init__(self, heads=8):
        super().__init__()
        self.num_attention_heads, self.head_dim = heads, HEAD_DIM
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(WIDTH, heads * HEAD_DIM) for _ in range(3))
        self.o_proj = nn.Linear(heads * HEAD_DIM, WIDTH)

    def forward(self, x):
        return self.o_proj(_attend(x, self.q_proj(x), self.k_proj(x), self.v_proj(x), self.head_dim))


class BartAttention(nn.Module):
    """BART's layout: q/k/v/out_proj, num_heads and head_dim; embed_dim is the model width."""

    def __init__(self, heads=8):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = WIDTH, heads, WIDTH // heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.out_proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.out_proj(_attend(x, self.q_proj(x), self.k_proj(x), self.v_proj(x), self.head_dim))


class GPT2Attention(nn.Module):
    """GPT-2's layout: a Conv1D c_attn making [q | k | v], split_size wide each, and a Conv1D c_proj."""

    def __init__(self, heads=8):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = WIDTH, heads, HEAD_DIM
        self.split_size = heads * HEAD_DIM
        self.c_attn, self.c_proj = Conv1D(3 * self.split_size, WIDTH), Conv1D(WIDTH, self.split_size)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(self.split_size, dim=-1)
        return self.c_proj(_attend(x, q, k, v, self.head_dim, causal=True))


ATTENTION = {"vit": ViTAttention, "bart": BartAttention, "gpt2": GPT2Attention}


class Stack(nn.Module):
    """``depth`` residual layers of ViT-, BART- or GPT-2-style attention (layers.N.attn), with a
    config of that model_type."""

    def __init__(self, kind="vit", depth=2, heads=(8, 8)):
        super().__init__()
        torch.manual_seed(0)
        self.config = types.SimpleNamespace(model_type=kind, num_attention_heads=heads[0], hidden_size=WIDTH)
        self.embed = nn.Linear(5, WIDTH)
        self.layers = nn.ModuleList(nn.Module() for _ in range(depth))
        for layer, h in zip(self.layers, heads):
            layer.attn = ATTENTION[kind](h)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + layer.attn(x)
        return x


def _removal_equals_zeroing(model, name, keep):
    """Removes heads other than ``keep`` of ``name`` from a copy, zeroes them in another, checks both
    compute the same function (and not the unpruned one); returns the pruned copy."""
    x = tokens()
    drop = [h for h in range(units(model.get_submodule(name))) if h not in keep]
    masked, pruned = copy.deepcopy(model).double(), copy.deepcopy(model).double()
    zero_heads(masked, name, drop)
    remove_heads(pruned, name, keep)
    with torch.no_grad():
        assert_same_function(pruned, masked, x.double())
        assert not torch.allclose(pruned(x.double()), copy.deepcopy(model).double()(x.double()))
    return pruned


def test_vit_attention_heads():
    """One key/value head per query head: every head is a unit; num_attention_heads follows."""
    model = Stack("vit")
    found = attention_modules(model)
    assert list(found) == ["layers.0.attn", "layers.1.attn"] and units(found["layers.0.attn"]) == 8
    pruned = _removal_equals_zeroing(model, "layers.0.attn", [0, 3, 4, 7])
    attn = pruned.layers[0].attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (16, 16, 16)
    assert (attn.o_proj.in_features, attn.o_proj.out_features, attn.num_attention_heads) == (16, WIDTH, 4)
    assert attn.q_proj.weight.shape == (16, WIDTH) and attn.o_proj.weight.shape == (WIDTH, 16)
    assert pruned.layers[1].attn.num_attention_heads == 8


def test_prune_heads_rewrites_a_vit_config(tmp_path):
    model, x = Stack("vit"), tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ViT config can describe the pruned heads: no warning
        tp.prune(model, 0.5, granularity="head", example_inputs=x)
    assert [layer.attn.num_attention_heads for layer in model.layers] == [4, 4]
    assert [layer.attn.k_proj.out_features for layer in model.layers] == [16, 16]
    assert (model.config.num_attention_heads, model.config.head_dim, model.config.hidden_size) == (4, HEAD_DIM, WIDTH)
    assert not hasattr(model.config, "num_key_value_heads")  # ViT's config has none
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", Stack("vit"))
    assert (fresh.config.num_attention_heads, fresh.config.head_dim) == (4, HEAD_DIM)
    assert not hasattr(fresh.config, "num_key_value_heads")
    torch.testing.assert_close(fresh(x), model(x))


def test_bart_attention_heads():
    """out_proj reads the heads; num_heads follows, embed_dim (the model width) stays."""
    model = Stack("bart")
    assert list(attention_modules(model)) == ["layers.0.attn", "layers.1.attn"]
    pruned = _removal_equals_zeroing(model, "layers.1.attn", [1, 2, 6])
    attn = pruned.layers[1].attn
    assert (attn.num_heads, attn.embed_dim, attn.head_dim) == (3, WIDTH, HEAD_DIM)
    assert (attn.q_proj.out_features, attn.v_proj.out_features, attn.out_proj.in_features) == (12, 12, 12)
    assert attn.out_proj.out_features == WIDTH and attn.out_proj.bias.shape == (WIDTH,)


def test_bart_config_warns_and_is_left(tmp_path):
    model, x = Stack("bart"), tokens()
    with pytest.warns(UserWarning, match="derives the head size from hidden_size"):
        tp.prune(model, 0.5, granularity="head", example_inputs=x)
    assert [(layer.attn.num_heads, layer.attn.embed_dim) for layer in model.layers] == [(4, WIDTH), (4, WIDTH)]
    assert model.config.num_attention_heads == 8  # left: it cannot say 4 heads of 4 in a width of 32
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", Stack("bart"))
    assert [layer.attn.num_heads for layer in fresh.layers] == [4, 4] and fresh.config.num_attention_heads == 8
    torch.testing.assert_close(fresh(x), model(x))


def _gpt2_columns(keep, split=8 * HEAD_DIM):
    """c_attn's output columns of heads ``keep``: their q, then k, then v features."""
    heads = torch.as_tensor(keep)
    return torch.cat([s * split + (heads[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).flatten() for s in range(3)])


def test_gpt2_fused_conv1d_attention_heads():
    """c_attn's q, k and v blocks each lose the heads' columns; split_size and nf follow."""
    model = Stack("gpt2")
    assert list(attention_modules(model)) == ["layers.0.attn", "layers.1.attn"]
    assert units(model.layers[0].attn) == 8
    keep = [0, 2, 5]
    pruned = _removal_equals_zeroing(model, "layers.0.attn", keep)
    attn, old = pruned.layers[0].attn, model.layers[0].attn
    assert (attn.num_heads, attn.split_size, attn.head_dim, attn.embed_dim) == (3, 12, HEAD_DIM, WIDTH)
    assert (attn.c_attn.nf, attn.c_attn.nx, attn.c_attn.bias.shape) == (36, WIDTH, (36,))
    assert attn.c_attn.weight.shape == (WIDTH, 36)
    assert (attn.c_proj.nf, attn.c_proj.nx, attn.c_proj.weight.shape) == (WIDTH, 12, (12, WIDTH))
    columns = _gpt2_columns(keep)
    torch.testing.assert_close(attn.c_attn.weight, old.c_attn.weight[:, columns].double())
    torch.testing.assert_close(attn.c_attn.bias, old.c_attn.bias[columns].double())
    torch.testing.assert_close(attn.c_proj.weight, old.c_proj.weight[columns[:12]].double())
    assert old.c_attn.weight.dtype == torch.float32  # the original was left as it was
    assert pruned.layers[1].attn.c_attn.nf == 96


def test_gpt2_head_scores_keep_the_largest_heads(tmp_path):
    """With "l2", heads whose q/k/v columns and c_proj rows are 3x larger are the ones kept."""
    model, x = Stack("gpt2", depth=1), tokens()
    big = [1, 4, 6, 7]
    attn = model.layers[0].attn
    with torch.no_grad():
        attn.c_attn.weight[:, _gpt2_columns(big)] *= 3
        attn.c_proj.weight[_gpt2_columns(big)[:16]] *= 3
    old = copy.deepcopy(attn)
    with pytest.warns(UserWarning, match="derives the head size from hidden_size"):
        tp.prune(model, 0.5, granularity="head", importance="l2", example_inputs=x)
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf) == (4, 16, 48)
    torch.testing.assert_close(attn.c_attn.weight, old.c_attn.weight[:, _gpt2_columns(big)])
    torch.testing.assert_close(attn.c_proj.weight, old.c_proj.weight[_gpt2_columns(big)[:16]])
    assert model.config.num_attention_heads == 8
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", Stack("gpt2", depth=1))
    assert (fresh.layers[0].attn.num_heads, fresh.layers[0].attn.split_size) == (4, 16)
    torch.testing.assert_close(fresh(x), model(x))


def test_gpt2_exclude_and_freeze_keep_heads():
    """Excluding c_attn (it makes the heads' q/k/v) or freezing c_proj keeps the heads; excluding
    only c_proj keeps its outputs (the model width), and the heads still go."""
    model, x = Stack("gpt2"), tokens()
    assert head_members("layers.0.attn", model.layers[0].attn) == [
        ("layers.0.attn.c_attn", "weight", 1), ("layers.0.attn.c_proj", "weight", 0)]
    first = copy.deepcopy(model.layers[0].attn)
    with pytest.warns(UserWarning, match="derives the head size"):
        tp.prune(model, 0.5, granularity="head", example_inputs=x, exclude=[model.layers[0].attn.c_attn])
    assert [layer.attn.num_heads for layer in model.layers] == [8, 4]
    torch.testing.assert_close(model.layers[0].attn.c_attn.weight, first.c_attn.weight)
    one = Stack("gpt2", depth=1)
    with pytest.raises(ValueError, match="no attention module whose heads can be pruned"):
        tp.prune(one, 0.5, granularity="head", example_inputs=x, exclude=[one.layers[0].attn.c_attn])
    with pytest.raises(ValueError, match="no attention module whose heads can be pruned"):
        tp.prune(one, 0.5, granularity="head", example_inputs=x, freeze=["layers.0.attn.c_proj"])
    assert (one.layers[0].attn.num_heads, one.layers[0].attn.c_attn.nf) == (8, 96)
    with pytest.warns(UserWarning, match="derives the head size"):
        tp.prune(one, 0.5, granularity="head", example_inputs=x, exclude=["layers.0.attn.c_proj"])
    assert (one.layers[0].attn.num_heads, one.layers[0].attn.c_proj.weight.shape) == (4, (16, WIDTH))


def test_gpt2_prune_twice_save_and_load(tmp_path):
    """Two head steps on the same modules replay in order through tp.load."""
    model, x = Stack("gpt2"), tokens()
    for _ in range(2):
        with pytest.warns(UserWarning, match="derives the head size"):
            tp.prune(model, 0.5, granularity="head", example_inputs=x)
    assert [(layer.attn.num_heads, layer.attn.split_size, layer.attn.c_attn.nf) for layer in model.layers] == [
        (2, 8, 24), (2, 8, 24)]
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", Stack("gpt2"))
    assert [layer.attn.c_proj.weight.shape for layer in fresh.layers] == [(8, WIDTH), (8, WIDTH)]
    torch.testing.assert_close(fresh(x), model(x))


def test_bart_with_fewer_decoder_heads_is_not_told_heads_were_pruned():
    class Widened(Stack):
        """Layer 1 stands for a decoder with 4 heads; ``hidden`` has channels to prune."""

        def __init__(self):
            super().__init__("bart", heads=(8, 4))
            self.hidden, self.embed = nn.Linear(5, 16), nn.Linear(16, WIDTH)

        def forward(self, x):
            return super().forward(F.relu(self.hidden(x)))

    model, x = Widened(), tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert model.hidden.out_features == 8  # channels went, no head did
    assert [layer.attn.num_heads for layer in model.layers] == [8, 4]
    assert not [str(w.message) for w in caught if "heads were pruned" in str(w.message)]


def _transformers_model(name):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=128, vocab_size=100,
                  max_position_embeddings=32)
    if name == "llama":
        return transformers.LlamaModel, transformers.LlamaConfig(num_key_value_heads=4, **common)
    if name == "qwen2":
        return transformers.Qwen2Model, transformers.Qwen2Config(num_key_value_heads=2, **common)
    if name == "gpt2":
        return transformers.GPT2Model, transformers.GPT2Config(n_embd=64, n_layer=2, n_head=8, n_positions=32,
                                                               vocab_size=100, bos_token_id=0, eos_token_id=0)
    if name == "vit":
        return transformers.ViTModel, transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                                             intermediate_size=128, image_size=16, patch_size=4)
    if name == "bart":
        return transformers.BartModel, transformers.BartConfig(
            d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=8, decoder_attention_heads=8,
            encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=100, max_position_embeddings=32)
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


@pytest.mark.parametrize("name", ["gpt2", "vit", "bart"])
def test_transformers_one_key_value_head_per_query_head(name, tmp_path):
    """GPT-2's fused Conv1D attention, ViT's and BART's separate projections: ViT's config takes
    the new head count and from_pretrained reloads it; GPT-2's and BART's warn and reload by tp.load."""
    cls, config = _transformers_model(name)
    torch.manual_seed(0)
    model = cls(copy.deepcopy(config)).eval()
    x = torch.randn(1, 3, 16, 16) if name == "vit" else torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        before = model(x).last_hidden_state
    if name == "vit":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tp.prune(model, 0.5, granularity="head", example_inputs=x)
        assert not [w for w in caught if "head" in str(w.message)]
        attn = model.get_submodule(next(iter(attention_modules(model))))
        assert (attn.num_attention_heads, attn.q_proj.out_features, attn.o_proj.in_features) == (4, 32, 32)
        assert (model.config.num_attention_heads, model.config.head_dim) == (4, 8)
        assert not hasattr(model.config, "num_key_value_heads")
        model.save_pretrained(tmp_path)
        reloaded = cls.from_pretrained(tmp_path).eval()
        assert reloaded.config.num_attention_heads == 4
    else:
        with pytest.warns(UserWarning, match="derives the head size"):
            tp.prune(model, 0.5, granularity="head", example_inputs=x)
        found = attention_modules(model)
        if name == "gpt2":
            assert list(found) == ["h.0.attn", "h.1.attn"]
            attn = model.h[0].attn
            assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.c_proj.weight.shape) == (4, 32, 96, (32, 64))
            assert model.config.n_head == 8
        else:
            assert len(found) == 6  # encoder and decoder self-attention, decoder cross-attention
            assert {m.num_heads for m in found.values()} == {4} and {m.embed_dim for m in found.values()} == {64}
            assert (model.config.encoder_attention_heads, model.config.decoder_attention_heads) == (8, 8)
        tp.save(model, tmp_path / "pruned.pt")
        reloaded = tp.load(tmp_path / "pruned.pt", cls(copy.deepcopy(config))).eval()
    with torch.no_grad():
        after = model(x).last_hidden_state
        torch.testing.assert_close(reloaded(x).last_hidden_state, after)
    assert not torch.allclose(after, before)  # heads went: the function changed
