"""Hugging Face configs after structural pruning: the width fields a transformers config holds
(``intermediate_size``, GPT-2's ``n_inner``, T5's ``d_ff``, BART's ``encoder_ffn_dim``, ...) are
rewritten from the pruned layers, so that ``save_pretrained`` + ``from_pretrained`` build the pruned
shapes and load the pruned weights.

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


def sync_config(model: nn.Module) -> None:
    """Rewrites ``model.config``'s width fields from its layers (see the module docstring); nothing
    for a model without a known ``config.model_type``."""
    config = getattr(model, "config", None)
    fields = FFN_FIELDS.get(getattr(config, "model_type", None), ())
    for field, pattern in fields:
        widths = {_width(m) for name, m in model.named_modules() if re.search(pattern, name)}
        widths.discard(None)
        if not widths or not hasattr(config, field):
            continue
        if len(widths) == 1:
            setattr(config, field, widths.pop())
        else:
            warnings.warn(f"the pruned layers have different widths {sorted(widths)}, which config.{field} cannot "
                          "hold: save_pretrained / from_pretrained would not rebuild this model; save it with "
                          "tp.save and load it with tp.load (or prune with scope='layer' for one width)", stacklevel=3)
