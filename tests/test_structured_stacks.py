"""granularity="layer" on stacks of transformer layers (structured/stacks.py): ShortGPT's block
influence ranks the layers, the lowest are removed from their ModuleList, ``layer_idx`` and the
config's depth fields follow, and the model reloads (`tp.load`; ``from_pretrained`` for Hugging
Face models, which need transformers and skip without it)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.structured.plan import steps_of
from torchprune.structured.stacks import block_influence, layer_stacks


class Config:
    """What the stacks code reads of a Hugging Face config: depth fields, per-layer lists, to_dict."""

    def __init__(self, layers):
        self.num_hidden_layers = layers
        self.layer_types = [f"type{i}" for i in range(layers)]

    def to_dict(self):
        return dict(vars(self))


class Block(nn.Module):
    def __init__(self, width, idx, scale):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.layer_idx = idx
        self.scale = scale

    def forward(self, hidden_states, mask=None):
        return (hidden_states + self.scale * torch.tanh(self.fc(hidden_states)), None)


class Stacked(nn.Module):
    """An embedding, a stack of residual blocks returning tuples (as HF layers do), a head."""

    def __init__(self, scales=(1.0, 0.05, 0.5, 0.01, 0.2, 0.8), width=8):
        super().__init__()
        torch.manual_seed(0)
        self.config = Config(len(scales))
        self.embed = nn.Linear(4, width)
        self.layers = nn.ModuleList([Block(width, i, s) for i, s in enumerate(scales)])
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, mask=None)[0]
        return self.head(h)


def inputs():
    return torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(1))


def hand_influence(model, x):
    """1 - cos(input, output) of each layer, per token, averaged: computed by running the layers by hand."""
    h, out = model.embed(x), []
    for layer in model.layers:
        y = layer(h)[0]
        cos = nn.functional.cosine_similarity(h.reshape(-1, h.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double(),
                                              dim=-1)
        out.append(float((1 - cos).mean()))
        h = y
    return out


def without(model, removed):
    """A copy of ``model`` with the layers at ``removed`` deleted by hand."""
    out = copy.deepcopy(model)
    out.layers = nn.ModuleList([m for i, m in enumerate(out.layers) if i not in removed])
    return out


def test_block_influence_is_the_hand_computed_value():
    model, x = Stacked().eval(), inputs()
    with torch.no_grad():
        found = block_influence(model, {"layers": model.layers}, [(x,)])
        expected = hand_influence(model, x)
    assert [found[("layers", i)] for i in range(6)] == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("sparsity,count", [(0.34, 2), (0.5, 3), (0.99, 5)])
def test_the_lowest_influence_layers_go_and_everything_follows(sparsity, count):
    model, x = Stacked().eval(), inputs()
    with torch.no_grad():
        influence = hand_influence(model, x)
    removed = sorted(sorted(range(6), key=lambda i: influence[i])[:count])
    reference = without(model, removed)
    tp.prune(model, sparsity, granularity="layer", example_inputs=x)
    assert steps_of(model) == [{"kind": "stack_layers", "stack": "layers", "removed": removed, "depth": 6,
                                "config": True}]
    assert len(model.layers) == 6 - count and model.config.num_hidden_layers == 6 - count
    assert model.config.layer_types == [f"type{i}" for i in range(6) if i not in removed]
    assert [layer.layer_idx for layer in model.layers] == list(range(6 - count))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_tp_load_replays_the_removal(tmp_path):
    model, x = Stacked().eval(), inputs()
    tp.prune(model, 0.5, granularity="layer", example_inputs=x)
    tp.save(model, tmp_path / "m.pt")
    loaded = tp.load(tmp_path / "m.pt", Stacked().eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.config.num_hidden_layers == 3 and [m.layer_idx for m in loaded.layers] == [0, 1, 2]
    with pytest.raises(ValueError, match="does not match the file"):
        tp.load(tmp_path / "m.pt", Stacked(scales=(1.0, 0.5, 0.2)).eval())  # a 3-layer stack


def test_exclude_keeps_a_layer_and_data_batches_rank():
    model, x = Stacked().eval(), inputs()
    with torch.no_grad():
        influence = hand_influence(model, x)
    lowest = min(range(6), key=lambda i: influence[i])
    tp.prune(model, 1 / 6, granularity="layer", example_inputs=x, exclude=[f"layers.{lowest}"])
    second = sorted(range(6), key=lambda i: influence[i])[1]
    assert steps_of(model)[0]["removed"] == [second]
    other = Stacked().eval()
    tp.prune(other, 1 / 6, granularity="layer", example_inputs=x, data=[inputs()])
    assert steps_of(other)[0]["removed"] == [lowest]


class TwoStacks(nn.Module):
    """An encoder-decoder shape: two stacks, one config."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Stacked(), Stacked(scales=(0.3, 0.02, 0.6, 0.04))
        self.config = self.first.config
        self.second.config = self.config

    def forward(self, x):
        return self.second(self.first(x)[..., :1].expand(*x.shape[:-1], 4))


def test_two_stacks_rank_together_and_leave_the_config(tmp_path):
    model, x = TwoStacks().eval(), inputs()
    with pytest.warns(UserWarning, match="several layer stacks"):
        tp.prune(model, 0.4, granularity="layer", example_inputs=x)  # 4 of the 10 layers
    steps = steps_of(model)
    assert sum(len(s["removed"]) for s in steps) == 4 and all(s["config"] is False for s in steps)
    assert model.config.num_hidden_layers == 6 and len(model.config.layer_types) == 6  # left as it was
    tp.save(model, tmp_path / "m.pt")
    loaded = tp.load(tmp_path / "m.pt", TwoStacks().eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_list_of_mixed_layers_is_no_stack():
    model = Stacked().eval()
    model.layers[1] = nn.Identity()  # no longer one class: not a stack
    assert layer_stacks(model, inputs()) == ({}, {})


# ----------------------------------------------------------------------------------------------------
# Hugging Face models, built from configs (no download)

def hf_model(kind):
    transformers = pytest.importorskip("transformers")  # here, not at module level: the tests above run without it
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=32)).eval()
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=4, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    config = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).eval()


def layer_states(model, ids):
    """The first layer's input and every layer's output hidden state (``output_hidden_states`` would
    give GPT-2's last one after its final LayerNorm)."""
    layers = {"bert": lambda m: m.encoder.layer, "gpt2": lambda m: m.transformer.h}.get(
        model.config.model_type, lambda m: m.model.layers)(model)
    states = []

    def first(module, args, kwargs):
        states.append(args[0] if args else kwargs["hidden_states"])

    def each(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [layers[0].register_forward_pre_hook(first, with_kwargs=True)]
    handles += [layer.register_forward_hook(each) for layer in layers]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return states


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "qwen2"])
def test_hugging_face_layers_removed_reload_and_generate(kind, tmp_path):
    model = hf_model(kind)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    states = layer_states(model, ids)
    influence = [float((1 - nn.functional.cosine_similarity(a.reshape(-1, 32).double(), b.reshape(-1, 32).double(),
                                                            dim=-1)).mean()) for a, b in zip(states, states[1:])]
    removed = sorted(sorted(range(4), key=lambda i: influence[i])[:2])
    pruned = copy.deepcopy(model)
    tp.prune(pruned, 0.5, granularity="layer", example_inputs=ids)
    assert steps_of(pruned)[0]["removed"] == removed and pruned.config.num_hidden_layers == 2
    if getattr(model.config, "layer_types", None) is not None:
        assert pruned.config.layer_types == [t for i, t in enumerate(model.config.layer_types) if i not in removed]
    with torch.no_grad():
        out = pruned(ids)[0]
    pruned.save_pretrained(tmp_path / "hf")
    again = type(model).from_pretrained(tmp_path / "hf").eval()
    loaded = tp.load(_saved(pruned, tmp_path), hf_model(kind))
    with torch.no_grad():
        assert torch.equal(again(ids)[0], out) and torch.equal(loaded(ids)[0], out)
    if kind != "bert":  # the KV cache is indexed by the renumbered layer_idx
        cached = pruned.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, use_cache=True)
        plain = pruned.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(cached, plain)


def _saved(model, tmp_path):
    path = tmp_path / "model.pt"
    tp.save(model, path)
    return path
