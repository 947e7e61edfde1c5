"""`torchprune.integrations.transformers.PrunerCallback` in a real ``Trainer.train()`` on a tiny BERT
built from a config (no download): the Pruner steps once per optimizer step while gradients are
still there, its state goes into every checkpoint, and a run resumed from a checkpoint ends with
the same masks and weights as the uninterrupted one. Skipped without transformers and accelerate
(CI has neither; the library never needs them)."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torchprune as tp  # noqa: E402
from torchprune.integrations.transformers import STATE_FILE, PrunerCallback  # noqa: E402

STEPS, SAVE_AT = 6, 3


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def dataset(n=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (n, 12), generator=g)
    labels = (ids[:, 0] % 2).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def make_pruner(model, importance="magnitude"):
    return tp.Pruner(model, 0.5, tp.schedules.Cubic(begin=0, end=4, every=2), importance=importance,
                     exclude=["classifier", "bert.pooler"])


def trainer(model, callback, out, max_steps=STEPS):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="steps", save_steps=SAVE_AT, logging_strategy="no", report_to=[], use_cpu=True, seed=0,
        data_seed=0, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback])


def test_the_pruner_steps_once_per_optimizer_step_and_reads_gradients(tmp_path):
    model = tiny_bert()
    pruner = make_pruner(model, importance="taylor")  # Taylor sums .grad: zero after zero_grad
    seen = []
    original = pruner._strategy.observe_step

    def observe():
        seen.append(sum(float(layer.weight.grad.abs().sum()) for layer in pruner._strategy._unique.values()))
        original()

    pruner._strategy.observe_step = observe
    trainer(model, PrunerCallback(pruner), tmp_path).train()
    assert pruner.steps == STEPS and len(seen) == STEPS and all(total > 0 for total in seen)
    assert pruner.sparsity == pytest.approx(0.5, abs=1e-3)
    for step in (SAVE_AT, STEPS):
        assert os.path.isfile(tmp_path / f"checkpoint-{step}" / STATE_FILE)


def test_a_resumed_run_ends_as_the_uninterrupted_one(tmp_path):
    straight = tiny_bert()
    straight_pruner = make_pruner(straight)
    trainer(straight, PrunerCallback(straight_pruner), tmp_path / "a").train()

    first = tiny_bert()
    trainer(first, PrunerCallback(make_pruner(first)), tmp_path / "b", max_steps=STEPS).train()  # writes checkpoint 3
    resumed = tiny_bert()
    resumed_pruner = make_pruner(resumed)
    trainer(resumed, PrunerCallback(resumed_pruner), tmp_path / "b").train(
        resume_from_checkpoint=str(tmp_path / "b" / f"checkpoint-{SAVE_AT}"))
    assert resumed_pruner.steps == STEPS
    masks, expected = tp.masks(resumed), tp.masks(straight)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in masks)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_resuming_from_a_checkpoint_without_the_pruner_state_is_refused(tmp_path):
    model = tiny_bert()
    trainer(model, PrunerCallback(make_pruner(model)), tmp_path).train()
    os.remove(tmp_path / f"checkpoint-{SAVE_AT}" / STATE_FILE)
    again = tiny_bert()
    with pytest.raises(RuntimeError, match="saved without PrunerCallback"):
        trainer(again, PrunerCallback(make_pruner(again)), tmp_path).train(
            resume_from_checkpoint=str(tmp_path / f"checkpoint-{SAVE_AT}"))


def test_finalize_at_the_end_and_argument_checks(tmp_path):
    model = tiny_bert()
    pruner = make_pruner(model)
    trainer(model, PrunerCallback(pruner, finalize=True), tmp_path).train()
    assert not tp.masks(model)  # permanent: plain layers back, pruned weights zero
    assert tp.sparsity(model) > 0
    with pytest.raises(TypeError, match="`pruner` must be a tp.Pruner"):
        PrunerCallback(model)
    with pytest.raises(TypeError, match="`finalize` must be a bool"):
        PrunerCallback(pruner, finalize=1)
