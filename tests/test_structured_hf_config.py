"""Hugging Face configs follow structural pruning (issue 15): the FFN width fields
(``intermediate_size``, GPT-2's ``n_inner``, T5's ``d_ff``, ...) are rewritten from the pruned layers,
so ``save_pretrained`` + ``from_pretrained`` rebuild the pruned model; with widths that differ per
layer the field is left and a warning says so. A stand-in model with a config runs without
transformers; the real models run where it is installed."""

import copy
import types

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.structured.hf_config import sync_config


class Block(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.intermediate, self.output = nn.Module(), nn.Module()
        self.intermediate.dense, self.output.dense = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.output.dense(torch.relu(self.intermediate.dense(x)))


class Encoder(nn.Module):
    """BERT's layer names (encoder.layer.N.intermediate.dense) and a config object."""

    def __init__(self, model_type="bert", width=8, hidden=32, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.config = types.SimpleNamespace(model_type=model_type, intermediate_size=hidden)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Block(width, hidden) for _ in range(layers))
        with torch.no_grad():  # layer 1's hidden units far apart in size, so a global ranking splits unevenly
            self.encoder.layer[1].intermediate.dense.weight[:24].mul_(10)
            self.encoder.layer[1].intermediate.dense.bias[:24].mul_(10)
            self.encoder.layer[1].output.dense.weight[:, :24].mul_(10)

    def forward(self, x):
        for block in self.encoder.layer:
            x = block(x)
        return x


def tokens():
    return torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))


def test_the_config_takes_the_pruned_width():
    model = Encoder()
    tp.prune(model, 0.5, granularity="channel", example_inputs=tokens())
    assert [b.intermediate.dense.out_features for b in model.encoder.layer] == [16, 16]
    assert model.config.intermediate_size == 16


def test_widths_that_differ_leave_the_config_and_warn():
    model = Encoder()
    with pytest.warns(UserWarning, match=r"different widths .* config.intermediate_size cannot hold"):
        tp.prune(model, 0.5, granularity="channel", scope="global", example_inputs=tokens())
    assert len({b.intermediate.dense.out_features for b in model.encoder.layer}) == 2
    assert model.config.intermediate_size == 32


def test_tp_load_rewrites_the_fresh_models_config(tmp_path):
    model = Encoder()
    tp.prune(model, 0.5, granularity="channel", example_inputs=tokens())
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", Encoder())
    assert fresh.config.intermediate_size == 16
    torch.testing.assert_close(fresh(tokens()), model(tokens()))


@pytest.mark.parametrize("config", [None, types.SimpleNamespace(model_type="unknown", intermediate_size=32),
                                    types.SimpleNamespace(model_type="bert")])
def test_other_models_and_configs_are_left_alone(config):
    model = Encoder()
    model.config = copy.copy(config)
    tp.prune(model, 0.5, granularity="channel", example_inputs=tokens())
    assert vars(model.config) == vars(config) if config is not None else model.config is None
    sync_config(nn.Linear(2, 2))  # no config at all: nothing to do


def _transformers_case(name):
    transformers = pytest.importorskip("transformers")
    if name == "bert":
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=100, max_position_embeddings=32)
        return transformers.BertModel, config, "intermediate_size", 64
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2Model, config, "n_inner", 128
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                      max_position_embeddings=32)
    return transformers.LlamaModel, config, "intermediate_size", 64


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_save_pretrained_and_from_pretrained_give_back_the_pruned_model(name, tmp_path):
    cls, config, field, width = _transformers_case(name)
    torch.manual_seed(0)
    model = cls(config).eval()
    x = torch.randint(0, 100, (1, 16))
    with pytest.warns(UserWarning):  # the attention and the residual width stay
        tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    assert getattr(model.config, field) == width
    model.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).last_hidden_state, model(x).last_hidden_state)
