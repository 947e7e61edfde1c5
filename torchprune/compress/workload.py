"""What the compressed model is calibrated, recovered and measured on.

For a Hugging Face model, text: tokenized batches of training sentences (calibration and
recovery), held-out sentences (quality), and fixed-length token inputs cut from the held-out text
(latency at batch x tokens, e.g. 1 x 128). For a torch model, the batches of a ``--data`` file,
the last ``--heldout`` of them held out, and their shapes for the latency.

Quality is measured against the dense model on the held-out inputs:

* ``cosine``: for models with token states and an ``attention_mask``, the mean cosine between the
  dense and pruned sentence embeddings (the mean of the last hidden states over each sentence's
  tokens, as sentence-transformers pools); otherwise the mean cosine between the two models'
  outputs, one row per sample;
* ``token_cosine``: the mean cosine of the last hidden states token by token (text only);
* ``nn_agreement``: the fraction of held-out inputs whose nearest other held-out input is the same
  under both models' embeddings.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibration import Inputs, call
from ..calibration import batches as split_batches
from ..recovery.losses import mean_pool, output_tensor, token_mask

__all__ = ["text_batches", "token_inputs", "positional", "outputs_of", "max_abs_diff", "quality"]

SEED = 0  # the order of the length-sorted training batches


def text_batches(tokenizer, texts: Sequence[str], batch_size: int, max_tokens: int,
                 by_length: bool = False) -> List[Dict[str, Tensor]]:
    """``texts`` tokenized in batches of ``batch_size``, each padded to its longest text and cut at
    ``max_tokens``: dicts of tensors, called as ``model(**batch)``.

    ``by_length`` batches texts of similar length together (then shuffles the batches, with a fixed
    seed): padding costs compute that trains nothing, and random batches of 8-40 word sentences are
    about half padding."""
    texts = list(texts)
    if by_length:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]]
        texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: (lengths[i], i))]
    batches = [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_tokens,
                              return_tensors="pt"))
               for i in range(0, len(texts), batch_size)]
    if by_length:
        random.Random(SEED).shuffle(batches)
    return batches


def _special_tokens(tokenizer) -> Tuple[List[int], List[int]]:
    """The ids the tokenizer puts before and after a text's own tokens ([CLS] and [SEP] for BERT),
    found by tokenizing one word with and without them."""
    with_special = tokenizer("word")["input_ids"]
    plain = tokenizer("word", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start], with_special[start + len(plain):]
    return [], []  # a tokenizer that rewrites the text when adding specials: none added


def token_inputs(tokenizer, texts: Sequence[str], batch: int, tokens: int) -> Dict[str, Tensor]:
    """``batch`` rows of exactly ``tokens`` tokens (no padding) cut from ``texts`` run together,
    with the special tokens the tokenizer adds around a text: the input of a latency measurement."""
    ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
    before, after = _special_tokens(tokenizer)
    body = tokens - len(before) - len(after)
    if body < 1 or not ids:
        raise ValueError(f"--latency tokens must leave room for the {len(before) + len(after)} special tokens "
                         f"and the text must have some, got {tokens} tokens and {len(ids)} text tokens")
    while len(ids) < batch * body:
        ids = ids + ids  # short held-out text: repeat it (the timing does not depend on the words)
    rows = [before + ids[i * body:(i + 1) * body] + after for i in range(batch)]
    input_ids = torch.tensor(rows, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def positional(inputs) -> tuple:
    """Example inputs for tp.sparsify's trace (positional tensors): token inputs as (input_ids,
    attention_mask), the order of every Hugging Face encoder's forward; a tuple or `tp.Inputs` by its
    positional arguments; a tensor as itself."""
    if isinstance(inputs, dict):
        return tuple(inputs[k] for k in ("input_ids", "attention_mask") if k in inputs)
    if isinstance(inputs, Inputs):
        return tuple(inputs.args)
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def max_abs_diff(a: nn.Module, b: nn.Module, inputs) -> float:
    """The largest absolute difference between the outputs of ``a`` and ``b`` on ``inputs``."""
    with torch.inference_mode():
        return float((output_tensor(call(a, inputs)) - output_tensor(call(b, inputs))).abs().max())


def outputs_of(model: nn.Module, data: Sequence[Any]) -> Tuple[Tensor, List[Tuple[Tensor, Any]]]:
    """The unit embeddings of every held-out input (one row each) and the raw output tensors with
    their token masks, under ``inference_mode``."""
    rows, raw = [], []
    with torch.inference_mode():
        for inputs, _ in split_batches(data, targets=False, model=model):
            states = output_tensor(call(model, inputs))
            mask = token_mask(inputs)
            pooled = mean_pool(states.float(), mask) if mask is not None and states.dim() == 3 else \
                states.float().reshape(states.shape[0], -1)
            rows.append(F.normalize(pooled, dim=-1))
            raw.append((states.float(), mask))
    return torch.cat(rows), raw


def quality(dense: Tuple[Tensor, list], pruned: Tuple[Tensor, list]) -> Dict[str, float]:
    """The quality numbers of the module docstring, from `outputs_of` of both models."""
    (dense_rows, dense_raw), (pruned_rows, pruned_raw) = dense, pruned
    result = {"cosine": float((dense_rows * pruned_rows).sum(1).mean())}
    if len(dense_rows) > 1:
        def nearest(vectors):
            similarity = vectors @ vectors.T
            similarity.fill_diagonal_(float("-inf"))
            return similarity.argmax(1)

        result["nn_agreement"] = float((nearest(dense_rows) == nearest(pruned_rows)).float().mean())
    if all(mask is not None and states.dim() == 3 for states, mask in dense_raw):
        cosines = [F.cosine_similarity(a, b, dim=-1)[mask.bool()] for (a, mask), (b, _) in zip(dense_raw, pruned_raw)]
        result["token_cosine"] = float(torch.cat(cosines).mean())
    return result
