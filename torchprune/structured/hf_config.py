"""Hugging Face configs after structural pruning: the width fields a transformers config holds
(``intermediate_size``, GPT-2's ``n_inner``, T5's ``d_ff``, BART's ``encoder_ffn_dim``, ...) and,
for LLaMA-style models, ViT and T5, the head counts (``num_attention_heads``,
``num_key_value_heads``, with ``head_dim``; T5's ``num_heads``) are rewritten from the pruned
layers, so that ``save_pretrained`` + ``from_pretrained`` build the pruned shapes and load the
pruned weights.

A config holds one width for every layer. When the pruned layers' widths differ (``scope="global"``)
the field cannot say so: it is left as it is and a warning says to save with ``tp.save`` /
``tp.load`` instead. Nothing here imports transformers: a model is recognised by
``model.config.model_type`` and its layers by their names.
"""

from __future__ import annotations

import re
import warnings
from typing import Dict, List, Tuple

from torch import nn

__all__ = ["sync_config", "FFN_FIELDS"]

# (newer transformers name ViT's layers layers.N.mlp.fc1)
_BERT_LIKE = [("intermediate_size", r"(^|\.)layers?\.\d+\.(intermediate\.dense|mlp\.fc1)$")]
_LLAMA_LIKE = [("intermediate_size", r"(^|\.)layers\.\d+\.mlp\.(gate|up)_proj$")]
#: model_type -> [(config field, regex of the layers whose output width the field holds)]
FFN_FIELDS: Dict[str, List[Tuple[str, str]]] = {
    **{t: _BERT_LIKE for t in ("bert", "roberta", "vit")},
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2")},
    "distilbert": [("hidden_dim", r"(^|\.)layer\.\d+\.ffn\.lin1$")],
    "gpt2": [("n_inner", r"(^|\.)h\.\d+\.mlp\.c_fc$")],
    "t5": [("d_ff", r"DenseReluDense\.wi(_0|_1)?$")],
    "bart": [("encoder_ffn_dim", r"(^|\.)encoder\.layers\.\d+\.fc1$"),
             ("decoder_ffn_dim", r"(^|\.)decoder\.layers\.\d+\.fc1$")],
}


def _width(module: nn.Module):
    """A Linear-like layer's output width (transformers' Conv1D keeps it in ``nf``)."""
    for attribute in ("out_features", "nf"):
        if isinstance(getattr(module, attribute, None), int):
            return getattr(module, attribute)
    return None


#: model_types whose attention has q/k/v/o_proj and head_dim, and whose config says head_dim and
#: num_attention_heads (and num_key_value_heads where it has one): LLaMA-style and ViT.
GROUPED_QUERY_TYPES = ("llama", "mistral", "qwen2", "vit")
#: model_types whose config cannot hold fewer heads: their head size is hidden_size / heads.
HEAD_SIZE_FROM_HIDDEN = ("bert", "roberta", "gpt2", "bart")
#: model_types whose config holds the head count (``num_heads``) apart from the head size (``d_kv``)
T5_TYPES = ("t5", "mt5")
#: attention module attributes that hold a query head count, and those that hold the head size
_COUNTS = ("num_attention_heads", "num_heads", "n_heads")
_SIZES = ("head_dim", "attention_head_size", "key_value_proj_dim")


def _head_shapes(model: nn.Module) -> set:
    """{(query heads, key/value heads, head size)} over the model's attention modules."""
    shapes = set()
    for m in model.modules():
        size = next((getattr(m, a) for a in _SIZES if isinstance(getattr(m, a, None), int)), None)
        q = getattr(m, "q_proj", None)
        if size and isinstance(getattr(q, "out_features", None), int):
            shapes.add((q.out_features // size, getattr(m, "k_proj", q).out_features // size, size))
        elif size:
            count = next((getattr(m, a) for a in _COUNTS if isinstance(getattr(m, a, None), int)), None)
            if count:
                shapes.add((count, count, size))
    return shapes


def _sync_heads(model: nn.Module, config, problems: List[str]) -> None:
    """Head counts after head pruning: LLaMA-style and ViT configs take them (with head_dim written
    out, as it no longer follows from hidden_size / heads), T5's too (its ``d_kv`` is apart);
    BERT-, GPT-2- and BART-style ones cannot, and a warning says so."""
    model_type = getattr(config, "model_type", None)
    if model_type in GROUPED_QUERY_TYPES:
        heads = _head_shapes(model)
        if len(heads) == 1:
            config.num_attention_heads, kv_heads, config.head_dim = heads.pop()
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = kv_heads
        elif heads:
            problems.append(_per_layer(sorted(h for h, _, _ in heads), "num_attention_heads"))
    elif model_type in T5_TYPES:  # one count for the encoder's and the decoder's attention
        counts = {h for h, _, _ in _head_shapes(model)}
        if len(counts) == 1:
            config.num_heads = counts.pop()
        elif counts:
            problems.append(_per_layer(sorted(counts), "num_heads"))
    elif model_type in HEAD_SIZE_FROM_HIDDEN:
        shapes = _head_shapes(model)  # (a head count differs per stack in BART: heads x size tells)
        counts = {h for h, _, _ in shapes}
        hidden = getattr(config, "hidden_size", None)
        if shapes and (counts != {getattr(config, "num_attention_heads", None)} if hidden is None
                       else any(h * size != hidden for h, _, size in shapes)):
            problems.append(f"heads were pruned ({sorted(counts)} per layer, config: {config.num_attention_heads}); "
                            f"a {model_type} config derives the head size from hidden_size / num_attention_heads, so "
                            "it cannot describe them: save with tp.save and load with tp.load")


def _per_layer(widths, field: str) -> str:
    return (f"the pruned layers have different widths {widths}, which config.{field} cannot hold: "
            "save_pretrained / from_pretrained would not rebuild this model; save it with tp.save and load "
            "it with tp.load (or prune with scope='layer' for one width)")


def sync_config(model: nn.Module, warn: bool = False) -> None:
    """Rewrites ``model.config``'s width and head fields from its layers (see the module
    docstring); nothing for a model without a known ``config.model_type``. ``warn``: say what the
    config cannot hold (tp.prune does, at its end; slicing and tp.load's replay, whose steps pass
    through mixed states, do not)."""
    config = getattr(model, "config", None)
    problems: List[str] = []
    _sync_heads(model, config, problems)
    fields = FFN_FIELDS.get(getattr(config, "model_type", None), ())
    for field, pattern in fields:
        widths = {_width(m) for name, m in model.named_modules() if re.search(pattern, name)}
        widths.discard(None)
        if not widths or not hasattr(config, field):
            continue
        if len(widths) == 1:
            setattr(config, field, widths.pop())
        else:
            problems.append(_per_layer(sorted(widths), field))
    for problem in problems if warn else ():
        warnings.warn(problem, stacklevel=3)
