"""Loading the model to compress, and saving the compressed one so that it loads again.

Two kinds of model:

* a Hugging Face model folder (it has a ``config.json``): ``transformers.AutoModel`` in fp32 and
  its tokenizer, read offline; the model works on text;
* a file that ``torch.load`` gives an ``nn.Module`` (a whole pickled model): it runs on the
  batches of a ``--data`` file. Unpickling runs code from the file: load only files you trust.

`save` writes the pruned model with `tp.save` (masks kept; ``tp.load`` replays them on a fresh copy
of the dense model) and, for Hugging Face, a ``save_pretrained`` folder with the pruned weights as
zeros, which any ``from_pretrained`` reads.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..io import load as tp_load
from ..io import save as tp_save
from ..masking import make_permanent

__all__ = ["Loaded", "load_model", "fresh_dense", "save_model", "reload_model", "reload_huggingface"]


@dataclass
class Loaded:
    """The dense model (eval mode, fp32), its tokenizer (None for a torch file) and where it came from."""

    model: nn.Module
    tokenizer: Any
    kind: str  # "huggingface" or "torch"
    source: str

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.source))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit("compressing a Hugging Face model folder needs transformers: pip install transformers") \
            from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_model(path: str) -> Loaded:
    """The model at ``path`` (a Hugging Face folder or a torch.load-able nn.Module file); ValueError
    when it is neither."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"MODEL {path!r} is a folder without config.json: give a Hugging Face model folder "
                             "or a file that torch.load gives an nn.Module")
        transformers = _transformers()
        model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        return Loaded(model, transformers.AutoTokenizer.from_pretrained(path), "huggingface", path)
    if not os.path.isfile(path):
        raise ValueError(f"MODEL {path!r} does not exist")
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module):
        raise ValueError(f"MODEL {path!r} holds a {type(model).__name__}, not an nn.Module (a state_dict needs "
                         "its model class: torch.save the whole model)")
    return Loaded(model.float().eval(), None, "torch", path)


def fresh_dense(loaded: Loaded) -> nn.Module:
    """A new dense copy of the loaded model (for each sparsity, and for reloading); the loaded
    model itself is never pruned."""
    return copy.deepcopy(loaded.model).eval()


def save_model(pruned: nn.Module, loaded: Loaded, folder: str) -> dict:
    """Writes ``pruned`` (masked) into ``folder``: ``model.pt`` by `tp.save`, and for Hugging Face a
    ``huggingface/`` folder (save_pretrained, pruned weights as zeros, plus the tokenizer). The paths."""
    os.makedirs(folder, exist_ok=True)
    paths = {"tp": os.path.join(folder, "model.pt")}
    tp_save(pruned, paths["tp"])
    if loaded.kind == "huggingface":
        paths["huggingface"] = os.path.join(folder, "huggingface")
        make_permanent(copy.deepcopy(pruned)).save_pretrained(paths["huggingface"])
        loaded.tokenizer.save_pretrained(paths["huggingface"])
    return paths


def reload_model(loaded: Loaded, path: str) -> nn.Module:
    """The masked model `save_model` wrote to ``path``, loaded with `tp.load` into a fresh dense copy."""
    return tp_load(path, fresh_dense(loaded)).eval()


def reload_huggingface(folder: str) -> nn.Module:
    """The ``save_pretrained`` folder read back with ``AutoModel.from_pretrained``."""
    return _transformers().AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
