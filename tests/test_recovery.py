"""Recovery after pruning: tp.recover (distillation from the dense teacher, with or without a
Pruner, checkpoints and resume), tp.recovery.distillation_loss / output_tensor, and
tp.recalibrate_bn (fresh BatchNorm statistics), each checked against hand computations.
"""

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
import torchprune.recovery.loop as loop
from torchprune.recovery import distillation_loss, output_tensor, token_mask

from conftest import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# helpers


def make_teacher(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(16, 32), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(32, 8))


def make_inputs(n=4, seed=1, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 16, generator=g) for _ in range(n)]


def pruned_copy(teacher, sparsity=0.8):
    student = copy.deepcopy(teacher)
    tp.prune(student, sparsity)
    return student


def mean_loss(student, teacher, data, kind="cosine", **kwargs):
    """The mean distillation loss over ``data`` with both models in eval mode (flags put back)."""
    flags = [(m, m.training) for m in list(student.modules()) + list(teacher.modules())]
    student.eval(), teacher.eval()
    try:
        with torch.no_grad():
            return sum(float(distillation_loss(student(x), teacher(x), kind, **kwargs)) for x in data) / len(data)
    finally:
        for module, training in flags:
            module.training = training


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def run(student, teacher, data, steps=100, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("lr", 1e-2)
    return tp.recover(student, teacher, data, steps, **kwargs)


class Stop(Exception):
    pass


def interrupt_at(monkeypatch, done):
    """Makes the checkpoint write of step ``done`` raise Stop after the file is written."""
    original = loop._save

    def bomb(path, st):
        original(path, st)
        if st["done"] == done:
            raise Stop()

    monkeypatch.setattr(loop, "_save", bomb)


# ---------------------------------------------------------------------------------------------
# tp.recover: the basic run


def test_recover_lowers_the_loss_and_keeps_masks_zeros_and_teacher():
    """Distillation after 80% pruning halves the cosine loss at least; the masks are the same
    tensors' values, pruned weights stay exactly zero, and the teacher is bit-identical."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    data = make_inputs()
    masks = {k: v.clone() for k, v in tp.masks(student).items()}
    teacher_before = state(teacher)
    before = mean_loss(student, teacher, data)
    result = run(student, teacher, data, steps=100)
    after = mean_loss(student, teacher, data)
    assert before > 0.1 and after < 0.5 * before
    assert set(tp.masks(student)) == set(masks) == {"0", "2"}
    for name, mask in tp.masks(student).items():
        assert torch.equal(mask, masks[name])
        assert (student.get_submodule(name).weight[~mask] == 0).all()
    assert_same_state(state(teacher), teacher_before)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.parameters())
    assert isinstance(result, tp.recovery.Recovery)
    assert result.steps == 100 and result.resumed_from is None and result.seconds > 0
    assert result.final_loss == result.history[-1]["loss"]


def test_flags_of_both_models_are_restored_per_module_and_teacher_runs_in_eval():
    """Mixed train/eval flags on both models come back module by module; the teacher's BatchNorm
    (left in train mode by the caller) keeps its running statistics: it ran in eval mode."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))
    student = pruned_copy(teacher)
    teacher.train()
    teacher[2].eval()
    student.eval()
    student[1].train()
    student[3].train()
    teacher_flags = [m.training for m in teacher.modules()]
    student_flags = [m.training for m in student.modules()]
    teacher_before = state(teacher)
    run(student, teacher, make_inputs(2), steps=5)
    assert [m.training for m in teacher.modules()] == teacher_flags
    assert [m.training for m in student.modules()] == student_flags
    assert_same_state(state(teacher), teacher_before)
    assert int(student[1].num_batches_tracked) == 5  # the student's BN trained (train_mode=True)


def test_history_rows_and_default_learning_rate_schedule():
    """Rows every ``log_every`` steps plus the last; the default AdamW warms up and decays to a
    tenth of ``lr`` at the last step."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    result = run(student, teacher, make_inputs(3), steps=25, lr=1e-3, log_every=10)
    assert [row["step"] for row in result.history] == [10, 20, 25]
    for row in result.history:
        assert set(row) == {"step", "loss", "lr", "seconds"}
        assert math.isfinite(row["loss"]) and row["loss"] >= 0
    assert result.history[-1]["lr"] == pytest.approx(1e-3 * loop.FLOOR, rel=1e-12)
    assert result.history[0]["lr"] > result.history[1]["lr"] > result.history[2]["lr"]
    factor = loop._warmup_cosine(100)
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(5) == pytest.approx(1.0) and factor(100) == pytest.approx(loop.FLOOR)


def test_default_optimizer_is_fused_adamw_where_every_parameter_allows():
    """The default AdamW (no weight decay) is fused for float CPU parameters, the loop for others, and a fused
    step moves the weights as the loop does up to rounding."""
    weights = [torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64)) for _ in range(2)]
    fused = loop._adamw(weights, 1e-2)
    assert fused.defaults["fused"] is True and fused.defaults["weight_decay"] == 0.0
    assert not loop._adamw([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))], 1e-2).defaults["fused"]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    plain = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        for group, optimizer in ((weights, fused), (twins, plain)):
            sum((w ** 3).sum() for w in group).backward()
            optimizer.step()
            optimizer.zero_grad()
    for w, twin in zip(weights, twins):  # 3 steps, each rounding the weight and an update of at most lr a few times
        bound = 3 * 8 * torch.finfo(torch.float64).eps * (twin.detach().abs() + 1e-2)
        assert ((w - twin).abs() <= bound).all()


def test_own_optimizer_keeps_its_learning_rate():
    """An optimizer passed in is used as is: no schedule on top of it."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    data = make_inputs()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    before = mean_loss(student, teacher, data)
    result = run(student, teacher, data, steps=30, optimizer=optimizer, log_every=5)
    assert [row["lr"] for row in result.history] == [0.05] * 6
    assert mean_loss(student, teacher, data) < before


def test_pruner_reaches_its_target_and_history_carries_sparsity():
    """With a Pruner the sparsity rises along the Cubic schedule to 0.8; rows carry it."""
    teacher = make_teacher()
    student = copy.deepcopy(teacher)
    pruner = tp.Pruner(student, 0.8, tp.schedules.Cubic(begin=0, end=20, every=5))
    data = make_inputs()
    result = run(student, teacher, data, steps=30, pruner=pruner, log_every=5)
    assert pruner.steps == 30
    assert pruner.sparsity == pytest.approx(0.8, abs=0.01)
    sparsities = [row["sparsity"] for row in result.history]
    # updates at steps 0 (to the initial 0), 5, 10, 15 and 20: rows after 5, 10, ..., 30 steps
    assert len(sparsities) == 6 and sparsities == sorted(sparsities)
    assert sparsities[0] == 0 and 0.3 < sparsities[1] < 0.6 and sparsities[4] == sparsities[5]
    assert sparsities[-1] == pruner.sparsity
    for name, mask in tp.masks(student).items():
        assert (student.get_submodule(name).weight[~mask] == 0).all()
        assert abs(float((~mask).float().mean()) - 0.8) < 0.01
    assert mean_loss(student, teacher, data) < 0.5


# ---------------------------------------------------------------------------------------------
# tp.recover: checkpoints and resume

STEPS = 24


def resume_setup(with_pruner, seed):
    """A fresh run's objects: student (its weights from ``seed``: a resume must overwrite them),
    Pruner, teacher (always seed 0) and a shuffling DataLoader."""
    teacher = make_teacher(0, dropout=0.2)
    other = make_teacher(seed, dropout=0.2)
    student = copy.deepcopy(other)
    pruner = None
    if with_pruner:
        pruner = tp.Pruner(student, 0.8, tp.schedules.Cubic(begin=0, end=20, every=5))
    else:
        tp.prune(student, 0.8)
    rows = list(torch.randn(20, 16, generator=torch.Generator().manual_seed(4)))
    loader = torch.utils.data.DataLoader(rows, batch_size=8, shuffle=True)  # 3 batches a round: 8, 8, 4
    return student, teacher, pruner, loader


def seeded(seed):
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("with_pruner", [False, True], ids=["masks", "pruner"])
@pytest.mark.parametrize("stop", [10, 15], ids=["mid-round", "round-end"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, monkeypatch, with_pruner, stop):
    """A run stopped after the checkpoint of step ``stop`` and resumed by a second call on fresh
    objects (other weights, other RNG state) ends bit-identical to an uninterrupted run, with the
    same logged losses; 3 batches a round: 15 ends a round, 10 is inside one."""
    seeded(0)
    student, teacher, pruner, loader = resume_setup(with_pruner, 0)
    seeded(7)
    straight = run(student, teacher, loader, steps=STEPS, pruner=pruner, lr=1e-2, log_every=1)

    path = tmp_path / "recover.pt"
    seeded(0)
    first, teacher2, first_pruner, first_loader = resume_setup(with_pruner, 0)
    seeded(7)
    interrupt_at(monkeypatch, stop)
    with pytest.raises(Stop):
        run(first, teacher2, first_loader, steps=STEPS, pruner=first_pruner, lr=1e-2, log_every=1,
            checkpoint=path, checkpoint_every=5)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["done"] == stop

    seeded(99)
    fresh, teacher3, fresh_pruner, fresh_loader = resume_setup(with_pruner, 3)
    seeded(12345)
    resumed = run(fresh, teacher3, fresh_loader, steps=STEPS, pruner=fresh_pruner, lr=1e-2, log_every=1,
                  checkpoint=path, checkpoint_every=5)
    assert resumed.resumed_from == stop
    assert_same_state(state(fresh), state(student))
    assert [row["step"] for row in resumed.history] == list(range(stop + 1, STEPS + 1))
    assert [row["loss"] for row in resumed.history] == [row["loss"] for row in straight.history[stop:]]
    assert [row["lr"] for row in resumed.history] == [row["lr"] for row in straight.history[stop:]]
    if with_pruner:
        assert fresh_pruner.steps == pruner.steps == STEPS
        assert fresh_pruner.sparsity == pruner.sparsity
    assert torch.load(path, weights_only=False)["done"] == STEPS


def test_finished_checkpoint_returns_at_once_without_change(tmp_path):
    """Calling again with the checkpoint of a finished run of the same steps trains nothing."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    data = make_inputs(2)
    path = tmp_path / "done.pt"
    run(student, teacher, data, steps=6, checkpoint=path)
    after = state(student)
    written = path.read_bytes()
    again = run(student, teacher, data, steps=6, checkpoint=path)
    assert again.resumed_from == 6 and again.history == [] and again.final_loss is None
    assert_same_state(state(student), after)
    assert path.read_bytes() == written


def test_checkpoint_of_other_steps_is_refused_without_change(tmp_path):
    """A checkpoint written for another number of steps: ValueError naming steps, nothing loaded."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    data = make_inputs(2)
    path = tmp_path / "c.pt"
    run(student, teacher, data, steps=6, checkpoint=path)
    fresh = pruned_copy(teacher)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"6 steps.*asks for 8"):
        run(fresh, teacher, data, steps=8, checkpoint=path)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("written_with", [True, False], ids=["written-with-pruner", "written-without"])
def test_checkpoint_with_and_without_pruner_do_not_mix(tmp_path, written_with):
    """A checkpoint with a Pruner's state refuses a call without one, and the other way round."""
    teacher = make_teacher()
    data = make_inputs(2)
    path = tmp_path / "c.pt"

    def objects(with_pruner):
        student = copy.deepcopy(teacher)
        if with_pruner:
            return student, tp.Pruner(student, 0.5, tp.schedules.Cubic(begin=0, end=4, every=2))
        tp.prune(student, 0.5)
        return student, None

    student, pruner = objects(written_with)
    run(student, teacher, data, steps=4, pruner=pruner, checkpoint=path)
    student, pruner = objects(not written_with)
    before = snapshot(student)
    with pytest.raises(ValueError, match="pruner"):
        run(student, teacher, data, steps=4, pruner=pruner, checkpoint=path)
    assert_unchanged(student, before)


def test_checkpoint_of_the_default_optimizer_refuses_an_own_optimizer(tmp_path):
    """The learning-rate schedule's state is part of a default-optimizer checkpoint."""
    teacher = make_teacher()
    data = make_inputs(2)
    path = tmp_path / "c.pt"
    run(pruned_copy(teacher), teacher, data, steps=4, checkpoint=path)
    student = pruned_copy(teacher)
    with pytest.raises(ValueError, match="optimizer"):
        run(student, teacher, data, steps=4, checkpoint=path, optimizer=torch.optim.SGD(student.parameters(), 0.1))


def test_a_torch_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    """Another torch.save'd object at the path: ValueError, the student unchanged."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    before = snapshot(student)
    with pytest.raises(ValueError, match="not a tp.recover checkpoint"):
        run(student, teacher, make_inputs(2), steps=4, checkpoint=path)
    assert_unchanged(student, before)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""], ids=["text", "empty"])
def test_a_file_that_is_not_a_torch_file_is_refused_with_value_error(tmp_path, content):
    """Any file that is not a tp.recover checkpoint should give the ValueError that says so."""
    teacher = make_teacher()
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a tp.recover checkpoint"):
        run(pruned_copy(teacher), teacher, make_inputs(2), steps=4, checkpoint=path)


def test_bad_layers_with_an_existing_checkpoint_changes_nothing(tmp_path):
    """A failing call leaves the student as it was, also when a checkpoint exists."""
    teacher = make_teacher()
    data = make_inputs(2)
    path = tmp_path / "c.pt"
    run(pruned_copy(teacher), teacher, data, steps=4, checkpoint=path)
    student = pruned_copy(teacher)
    before = snapshot(student)
    with pytest.raises(ValueError, match="nope"):
        run(student, teacher, data, steps=4, checkpoint=path, layers=["nope"])
    assert_unchanged(student, before)


# ---------------------------------------------------------------------------------------------
# tp.recover: the loss, outputs, layers and train mode


class Encoder(nn.Module):
    """A tiny sentence encoder: ``model(x=..., attention_mask=...)`` returns a dict with
    ``last_hidden_state`` [batch, tokens, 8] and ``logits`` [batch, tokens, 5]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.head = nn.Linear(8, 5)

    def forward(self, x, attention_mask):
        hidden = self.body(x)
        return {"last_hidden_state": hidden, "logits": self.head(hidden)}


def encoder_batches(n=3, seed=2):
    """Dict batches with padding: the padded tokens hold huge inputs, so any loss that counts
    them is far from one that does not."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 6, 16, generator=g)
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[0, 4:] = 0
        mask[2, 2:] = 0
        x[mask == 0] = 50.0
        out.append({"x": x, "attention_mask": mask})
    return out


def encoder_case():
    """A seeded `Encoder` teacher, its 80%-pruned student, one padded batch, its mask, and both
    models' outputs on it (no grad)."""
    torch.manual_seed(0)
    teacher = Encoder()
    student = pruned_copy(teacher)
    batch = encoder_batches(1)[0]
    with torch.no_grad():
        s, t = student(**batch), teacher(**batch)
    return teacher, student, batch, batch["attention_mask"], s, t


def first_row_loss(student, teacher, batch, **kwargs):
    """The loss recover logs at its first step (taken before the first update)."""
    result = run(copy.deepcopy(student), teacher, [batch], steps=1, log_every=1, **kwargs)
    return result.history[0]["loss"]


@pytest.mark.parametrize("kind,temperature", [("cosine", 2.0), ("mse", 2.0), ("kl", 1.0), ("kl", 3.0)])
def test_each_loss_kind_is_the_one_computed_and_goes_down(kind, temperature):
    """The first logged loss is distillation_loss(kind) of the two outputs; training lowers it."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    data = make_inputs()
    with torch.no_grad():
        expected = float(distillation_loss(student(data[0]), teacher(data[0]), kind, temperature=temperature))
    assert first_row_loss(student, teacher, data[0], loss=kind, temperature=temperature) == pytest.approx(
        expected, rel=1e-6)
    before = mean_loss(student, teacher, data, kind, temperature=temperature)
    run(student, teacher, data, steps=100, loss=kind, temperature=temperature)
    assert mean_loss(student, teacher, data, kind, temperature=temperature) < 0.6 * before


def test_embedding_loss_on_dict_batches_uses_the_attention_mask():
    """Dict batches are called as model(**batch); the embedding loss pools over the mask's tokens."""
    torch.manual_seed(0)
    teacher = Encoder()
    student = pruned_copy(teacher)
    data = encoder_batches()
    batch = data[0]
    with torch.no_grad():
        s, t = student(**batch)["last_hidden_state"], teacher(**batch)["last_hidden_state"]
    masked = float(distillation_loss(s, t, "embedding", batch["attention_mask"]))
    unmasked = float(distillation_loss(s, t, "embedding"))
    logged = first_row_loss(student, teacher, batch, loss="embedding")
    assert logged == pytest.approx(masked, rel=1e-6)
    assert abs(logged - unmasked) > 1e-3

    def loss_over(model):
        with torch.no_grad():
            return sum(float(distillation_loss(model(**b)["last_hidden_state"], teacher(**b)["last_hidden_state"],
                                               "embedding", b["attention_mask"])) for b in data)

    before = loss_over(student)
    run(student, teacher, data, steps=100, loss="embedding")
    assert loss_over(student) < 0.6 * before


def test_output_names_the_tensor_of_a_dict_output():
    """Default: last_hidden_state; ``output="logits"`` distils the logits instead."""
    teacher, student, batch, mask, s, t = encoder_case()
    hidden = float(distillation_loss(s["last_hidden_state"], t["last_hidden_state"], "cosine", mask))
    logits = float(distillation_loss(s["logits"], t["logits"], "cosine", mask))
    assert abs(hidden - logits) > 1e-4
    assert first_row_loss(student, teacher, batch) == pytest.approx(hidden, rel=1e-6)
    assert first_row_loss(student, teacher, batch, output="logits") == pytest.approx(logits, rel=1e-6)


def test_output_naming_a_missing_key_raises_type_error_without_change():
    teacher = make_teacher()
    student = pruned_copy(teacher)
    before = snapshot(student)
    with pytest.raises(TypeError, match="'logits'"):
        run(student, teacher, make_inputs(1), steps=2, output="logits")
    assert_unchanged(student, before)


def test_callable_loss_gets_both_outputs_and_the_inputs():
    """A callable loss(student_output, teacher_output, inputs) is what is minimized; the teacher's
    output carries no graph."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    data = make_inputs()
    seen = []

    def loss(s, t, inputs):
        seen.append((s.requires_grad, t.requires_grad, inputs))
        return F.mse_loss(s, t)

    before = mean_loss(student, teacher, data, "mse")
    result = run(student, teacher, data, steps=40, loss=loss, log_every=1)
    assert len(seen) == 40 and all(sg and not tg for sg, tg, _ in seen)
    assert all(inputs is data[i % 4] for i, (_, _, inputs) in enumerate(seen))
    with torch.no_grad():
        first = float(F.mse_loss(pruned_copy(teacher)(data[0]), teacher(data[0])))
    assert result.history[0]["loss"] == pytest.approx(first, rel=1e-6)
    assert mean_loss(student, teacher, data, "mse") < 0.5 * before


def test_layers_add_a_normalized_mse_term_each():
    """``layers=["0"]``: the logged loss is the output's cosine plus the layer's normalized MSE."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    x = make_inputs(1)[0]
    with torch.no_grad():
        out = float(distillation_loss(student(x), teacher(x), "cosine"))
        hidden = float(distillation_loss(student[0](x), teacher[0](x), "mse"))
        hidden2 = float(distillation_loss(student[:2](x), teacher[:2](x), "mse"))
    assert hidden > 0.05
    assert first_row_loss(student, teacher, x, layers=["0"]) == pytest.approx(out + hidden, rel=1e-6)
    assert first_row_loss(student, teacher, x, layers=("0", "1")) == pytest.approx(out + hidden + hidden2, rel=1e-6)
    for name in ("0", "2"):
        assert not student[int(name)]._forward_hooks and not teacher[int(name)]._forward_hooks


def test_layers_on_token_outputs_count_only_the_masked_tokens():
    """A layer output [batch, tokens, features] gets the batch's attention_mask as well."""
    teacher, student, batch, mask, s, t = encoder_case()
    with torch.no_grad():
        out = float(distillation_loss(s["last_hidden_state"], t["last_hidden_state"], "cosine", mask))
        layer = float(distillation_loss(student.body[0](batch["x"]), teacher.body[0](batch["x"]), "mse", mask))
    assert first_row_loss(student, teacher, batch, layers=["body.0"]) == pytest.approx(out + layer, rel=1e-6)


def test_unknown_layer_name_raises_value_error_naming_it():
    teacher = make_teacher()
    student = pruned_copy(teacher)
    before = snapshot(student)
    with pytest.raises(ValueError, match=r"\['9'\]"):
        run(student, teacher, make_inputs(1), steps=2, layers=["0", "9"])
    assert_unchanged(student, before)
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks


def test_layer_missing_only_in_the_teacher_leaves_no_hook_on_the_student():
    """A layer name the teacher lacks: ValueError, and no hook stays behind on the student."""
    teacher = make_teacher()
    student = nn.Sequential(*pruned_copy(teacher), nn.Identity())
    with pytest.raises(ValueError, match="teacher"):
        run(student, teacher, make_inputs(1), steps=2, layers=["3"])
    assert not student[3]._forward_hooks


class Recorder(nn.Module):
    """Keeps self.training at each forward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


@pytest.mark.parametrize("train_mode", [True, False])
def test_train_mode_sets_the_students_mode_and_the_teacher_is_in_eval(train_mode):
    """The student runs in train mode by default and in eval mode with train_mode=False; the
    teacher always in eval; both get their flags back."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 8), Recorder())
    student = pruned_copy(teacher)
    student.eval()
    teacher.train()
    run(student, teacher, make_inputs(2), steps=3, train_mode=train_mode)
    assert student[1].seen == [train_mode] * 3
    assert teacher[1].seen == [False] * 3
    assert not student.training and not student[1].training and teacher.training and teacher[1].training


def test_input_target_pairs_are_read_as_inputs_with_targets_ignored():
    """(inputs, targets) batches: only the inputs go into the models."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    xs = make_inputs()
    data = [(x, torch.randint(0, 8, (8,))) for x in xs]
    with torch.no_grad():
        expected = float(distillation_loss(student(xs[0]), teacher(xs[0]), "cosine"))
    assert first_row_loss(student, teacher, data[0]) == pytest.approx(expected, rel=1e-6)
    before = mean_loss(student, teacher, xs)
    run(student, teacher, data, steps=100)
    assert mean_loss(student, teacher, xs) < 0.5 * before


def test_sparsified_student_trains_in_its_sparse_layers_keeping_the_pattern():
    """A tp.sparsify'd student (SparseLinear layers): the loss goes down, only the stored values
    move, the row pointers and column indices stay the same."""
    teacher = make_teacher()
    pruned = pruned_copy(teacher)
    masks = {k: v.clone() for k, v in tp.masks(pruned).items()}
    student = tp.sparsify(pruned, min_sparsity=0.0)
    assert all(isinstance(student[int(n)], tp.nn.SparseLinear) for n in masks)
    packed = {n: (student[int(n)].row_ptr.clone(), student[int(n)].col_idx.clone(), student[int(n)].values.clone())
              for n in masks}
    data = make_inputs()
    before = mean_loss(student, teacher, data)
    run(student, teacher, data, steps=100)
    assert mean_loss(student, teacher, data) < 0.5 * before
    for name, (row_ptr, col_idx, values) in packed.items():
        layer = student[int(name)]
        assert torch.equal(layer.row_ptr, row_ptr) and torch.equal(layer.col_idx, col_idx)
        assert layer.values.shape == values.shape and not torch.equal(layer.values, values)
        dense = layer.to_dense().weight
        assert (dense[~masks[name]] == 0).all()


def test_callable_loss_returning_nan_raises_floating_point_error_and_cleans_up():
    """A non-finite loss stops the run with FloatingPointError naming the step; hooks are removed
    and flags restored."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    student.eval()
    calls = []

    def loss(s, t, inputs):
        calls.append(1)
        return F.mse_loss(s, t) * (float("nan") if len(calls) == 3 else 1.0)

    with pytest.raises(FloatingPointError, match="nan at step 2"):
        run(student, teacher, make_inputs(), steps=10, loss=loss, layers=["0"])
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks
    assert not any(m.training for m in student.modules())
    assert all(p.grad is None for p in student.parameters())


def test_exploding_learning_rate_raises_floating_point_error():
    """lr = 1e30 drives the outputs to inf and the MSE with them: FloatingPointError."""
    teacher = make_teacher()
    student = pruned_copy(teacher)
    with pytest.raises(FloatingPointError, match="lower `lr`"):
        run(student, teacher, make_inputs(), steps=50, loss="mse", lr=1e30)


# ---------------------------------------------------------------------------------------------
# tp.recover: argument errors


def _other_pruner():
    return tp.Pruner(make_teacher(5), 0.5, tp.schedules.Cubic(begin=0, end=4, every=2))


BAD_ARGUMENTS = {  # name: (changes to the call (a callable: of the call's keywords), exception, message)
    "student-not-module": (dict(student={"a": 1}), TypeError, "`student`"),
    "teacher-not-module": (dict(teacher=lambda kw: [kw["teacher"]]), TypeError, "`teacher`"),
    "teacher-is-student": (dict(teacher=lambda kw: kw["student"]), ValueError, "`teacher`"),
    "one-pass-iterator": (dict(data=lambda kw: iter(kw["data"])), TypeError, "`data`"),
    "generator": (dict(data=lambda kw: (x for x in kw["data"])), TypeError, "`data`"),
    "steps-0": (dict(steps=0), ValueError, "`steps`"),
    "steps-negative": (dict(steps=-1), ValueError, "`steps`"),
    "steps-bool": (dict(steps=True), ValueError, "`steps`"),
    "steps-float": (dict(steps=1.5), ValueError, "`steps`"),
    "loss-unknown": (dict(loss="l1"), ValueError, "`loss`"),
    "loss-none": (dict(loss=None), ValueError, "`loss`"),
    "lr-0": (dict(lr=0), ValueError, "`lr`"),
    "lr-negative": (dict(lr=-1e-3), ValueError, "`lr`"),
    "lr-nan": (dict(lr=float("nan")), ValueError, "`lr`"),
    "lr-bool": (dict(lr=True), ValueError, "`lr`"),
    "pruner-other-model": (dict(pruner=lambda kw: _other_pruner()), ValueError, "`pruner`"),
    "pruner-not-pruner": (dict(pruner="magnitude"), TypeError, "`pruner`"),
    "checkpoint-every-0": (dict(checkpoint_every=0), ValueError, "`checkpoint_every`"),
    "log-every-0": (dict(log_every=0), ValueError, "`log_every`"),
    "empty-data": (dict(data=[]), ValueError, "`data` yielded no batch"),
    "kl-temperature-0": (dict(loss="kl", temperature=0.0), ValueError, "`temperature`"),
    "temperature-negative": (dict(temperature=-1.0), ValueError, "`temperature`"),
    "shares-parameters": (dict(teacher=lambda kw: nn.Sequential(kw["student"][0])), ValueError, "sharing no parameter"),
    "layers-a-string": (dict(layers="0"), TypeError, "`layers`"),
    "optimizer-not-optimizer": (dict(optimizer="adam"), TypeError, "`optimizer`"),
    "train-mode-not-bool": (dict(train_mode=1), TypeError, "`train_mode`"),
    "pruner-finalized": (dict(pruner=lambda kw: _finalized_pruner(kw["student"])), ValueError, "finalized"),
    "eval-mode-starves-wanda": (dict(train_mode=False, pruner=lambda kw: _wanda_pruner(kw["student"])), ValueError,
                                "`train_mode=False`"),
    "teacher-cache-not-bool": (dict(teacher_cache=1), TypeError, "`teacher_cache` must be a bool"),
    "teacher-cache-dataloader": (dict(teacher_cache=True, data=lambda kw: torch.utils.data.DataLoader(kw["data"])),
                                 ValueError, "`teacher_cache=True` needs `data` as a list or tuple"),
    "teacher-cache-callable-loss": (dict(teacher_cache=True, loss=lambda kw: _squared), ValueError,
                                    "`teacher_cache=True` works with the built-in losses only"),
}


def _squared(student_out, teacher_out, inputs):
    return (student_out - teacher_out).pow(2).mean()


def _finalized_pruner(student):
    pruner = tp.Pruner(student, 0.8, tp.schedules.Cubic(begin=0, end=4, every=2))
    pruner.finalize()
    return pruner


def _wanda_pruner(student):
    return tp.Pruner(student, 0.8, tp.schedules.Cubic(begin=0, end=4, every=2), importance="wanda")


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_naming_the_argument_and_change_nothing(case, tmp_path):
    """Each bad argument gives its TypeError/ValueError naming it; student and teacher unchanged,
    no checkpoint written."""
    changes, error, message = BAD_ARGUMENTS[case]
    teacher = make_teacher()
    student = pruned_copy(teacher)
    kwargs = dict(student=student, teacher=teacher, data=make_inputs(2), steps=4, progress=False,
                  checkpoint=tmp_path / "c.pt")
    for key, value in changes.items():
        kwargs[key] = value(kwargs) if callable(value) else value
    student_before, teacher_before = snapshot(student), snapshot(teacher)
    with pytest.raises(error, match=message):
        tp.recover(**kwargs)
    assert_unchanged(student, student_before)
    assert_unchanged(teacher, teacher_before)
    assert not (tmp_path / "c.pt").exists()


# ---------------------------------------------------------------------------------------------
# distillation_loss and output_tensor


def pair(shape=(3, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64),
            torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5)


MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def hand_loss(s, t, kind, mask=None, temperature=2.0):
    """Each loss written out position by position (float64)."""
    keep = torch.ones(s.shape[:-1], dtype=torch.bool) if mask is None else mask.bool()
    rows_s, rows_t = s[keep], t[keep]  # [positions, features]
    n = rows_s.shape[0]

    def cos(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))

    def nmse():
        mean = float(rows_t.mean())
        variance = float(((rows_t - mean) ** 2).mean())
        return float(((rows_s - rows_t) ** 2).mean()) / variance

    if kind == "cosine":
        return sum(1 - cos(rows_s[i], rows_t[i]) for i in range(n)) / n
    if kind == "mse":
        return nmse()
    if kind == "kl":
        total = 0.0
        for i in range(n):
            p = torch.softmax(rows_t[i] / temperature, 0)
            q = torch.softmax(rows_s[i] / temperature, 0)
            total += float((p * (p.log() - q.log())).sum())
        return temperature ** 2 * total / n
    if kind == "embedding":
        pooled = []
        for b in range(s.shape[0]):
            tokens = keep[b]
            pooled.append(1 - cos(s[b][tokens].mean(0), t[b][tokens].mean(0)))
        return sum(pooled) / len(pooled) + nmse()
    raise AssertionError(kind)


KIND_CASES = [("cosine", 2.0), ("mse", 2.0), ("kl", 1.0), ("kl", 2.0), ("kl", 3.5), ("embedding", 2.0)]


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("kind,temperature", KIND_CASES)
def test_distillation_loss_matches_the_hand_computation(kind, temperature, masked):
    s, t = pair()
    mask = MASK if masked else None
    got = distillation_loss(s, t, kind, mask, temperature)
    assert got.dim() == 0 and got.dtype == torch.float64
    expected = hand_loss(s, t, kind, mask, temperature)
    assert float(got) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("kind", ["cosine", "mse", "kl", "embedding"])
def test_masked_positions_do_not_count(kind):
    """Changing the padded positions changes nothing; a bool mask equals a 0/1 one; without the
    mask the padding counts."""
    s, t = pair()
    got = distillation_loss(s, t, kind, MASK)
    s2, t2 = s.clone(), t.clone()
    s2[MASK == 0] = 1e3
    t2[MASK == 0] = -7.0
    assert torch.equal(distillation_loss(s2, t2, kind, MASK), got)
    assert torch.equal(distillation_loss(s, t, kind, MASK.bool()), got)
    assert abs(float(distillation_loss(s2, t2, kind)) - float(got)) > 1e-3


@pytest.mark.parametrize("kind", ["cosine", "mse", "kl", "embedding"])
def test_gradient_reaches_the_student_only(kind):
    s, t = pair()
    s.requires_grad_(True)
    t.requires_grad_(True)
    distillation_loss(s, t, kind, MASK).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert (s.grad[MASK == 0] == 0).all()  # padding gets no gradient either


def test_identical_outputs_give_zero_and_a_constant_teacher_stays_finite():
    s, _ = pair()
    for kind in ("cosine", "mse", "kl", "embedding"):
        assert float(distillation_loss(s, s.clone(), kind)) == pytest.approx(0.0, abs=1e-12)
    constant = torch.full((4, 6), 3.0)
    assert math.isfinite(float(distillation_loss(torch.zeros(4, 6), constant, "mse")))


@pytest.mark.parametrize("call,message", [
    (lambda s, t: distillation_loss(s, t[:, :4], "cosine"), "differ in shape"),
    (lambda s, t: distillation_loss(s, t, "l2"), "`loss` must be one of"),
    (lambda s, t: distillation_loss(s, t, "cosine", MASK[:, :4]), "`mask` of shape"),
    (lambda s, t: distillation_loss(s, t, "kl", temperature=0.0), "`temperature`"),
    (lambda s, t: distillation_loss(s[0], t[0], "embedding"), r"\[batch, tokens, features\]"),
], ids=["shape", "kind", "mask-shape", "temperature", "embedding-2d"])
def test_distillation_loss_refuses_bad_input(call, message):
    s, t = pair()
    with pytest.raises(ValueError, match=message):
        call(s, t)


class Output:
    def __init__(self, **fields):
        self.__dict__.update(fields)


A, B = torch.zeros(2), torch.ones(2)


@pytest.mark.parametrize("output,key,expected", [
    ({"logits": B, "last_hidden_state": A}, None, A),
    (Output(logits=B, last_hidden_state=A), None, A),
    ({"logits": B}, None, B),
    (Output(logits=B, hidden_states=(A,)), None, B),
    ({"last_hidden_state": "text", "logits": B}, None, B),
    (A, None, A),
    ((B, A), None, B),
    ([A, B], None, A),
    ({"logits": B, "pooled": A}, "pooled", A),
    (Output(logits=B, pooled=A), "pooled", A),
], ids=["dict-hidden-first", "object-hidden-first", "dict-logits", "object-logits", "non-tensor-skipped",
        "tensor", "tuple", "list", "dict-key", "object-key"])
def test_output_tensor_picks_the_tensor(output, key, expected):
    assert output_tensor(output, key) is expected


@pytest.mark.parametrize("output,key", [
    (3, None), ((), None), (("text", A), None), ({"pooled": A}, None), ({"logits": B}, "pooled"),
    (Output(logits=B), "pooled"), (A, "logits"),
], ids=["int", "empty-tuple", "tuple-non-tensor", "dict-no-known-key", "dict-missing-key", "object-missing-key",
        "tensor-with-key"])
def test_output_tensor_raises_type_error_without_a_tensor(output, key):
    with pytest.raises(TypeError):
        output_tensor(output, key)


def test_token_mask_reads_dicts_and_inputs_keywords():
    mask = torch.ones(2, 3)
    assert token_mask({"x": A, "attention_mask": mask}) is mask
    assert token_mask(tp.Inputs(A, attention_mask=mask)) is mask
    assert token_mask(A) is None and token_mask((A, mask)) is None and token_mask({"attention_mask": [1]}) is None


# ---------------------------------------------------------------------------------------------
# tp.recalibrate_bn


class CNN(nn.Sequential):
    """conv -> dropout -> BN -> ReLU -> conv -> BN -> ReLU, in float64."""

    def __init__(self, momentum=0.1):
        torch.manual_seed(0)
        super().__init__(nn.Conv2d(3, 6, 3, padding=1), nn.Dropout(0.5), nn.BatchNorm2d(6, momentum=momentum),
                         nn.ReLU(), nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
        self.double()


def images(n=4, seed=3, batch=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(n)]


def stale_cnn():
    """A CNN whose running statistics come from training passes before pruning."""
    model = CNN()
    model.train()
    with torch.no_grad():
        for x in images(3, seed=9):
            model(x * 2 + 1)
    tp.prune(model, 0.7)
    return model


def hand_statistics(model, data):
    """Per BN (indices 2 and 5): the average over batches of each channel's mean and unbiased
    variance of its input, the first BN normalizing with the batch's statistics, dropout off."""
    conv1, bn1, conv2 = model[0], model[2], model[4]
    sums = {2: [0, 0], 5: [0, 0]}
    with torch.no_grad():
        for x in data:
            a1 = conv1(x)
            mean1, var1 = a1.mean((0, 2, 3)), a1.var((0, 2, 3), unbiased=True)
            biased = a1.var((0, 2, 3), unbiased=False)
            y1 = (a1 - mean1[:, None, None]) / torch.sqrt(biased[:, None, None] + bn1.eps)
            y1 = y1 * bn1.weight[:, None, None] + bn1.bias[:, None, None]
            a2 = conv2(torch.relu(y1))
            sums[2][0] += mean1
            sums[2][1] += var1
            sums[5][0] += a2.mean((0, 2, 3))
            sums[5][1] += a2.var((0, 2, 3), unbiased=True)
    return {i: (m / len(data), v / len(data)) for i, (m, v) in sums.items()}


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def assert_statistics(model, expected, batches):
    for index, (mean, var) in expected.items():
        bn = model[index]
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)
        assert int(bn.num_batches_tracked) == batches


def test_recalibrate_bn_gives_the_exact_average_of_the_batch_statistics():
    """After pruning, the running mean and variance of each BN are the average over the batches of
    the batch statistics (equal batch sizes: the mean is the overall mean), with dropout off."""
    model = stale_cnn()
    data = images(4)
    stale = bn_buffers(model)
    expected = hand_statistics(model, data)
    assert not torch.allclose(stale["2.running_mean"], expected[2][0])
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert tp.recalibrate_bn(model, data) is model
    assert_statistics(model, expected, 4)
    overall = torch.cat([model[0](x) for x in data]).mean((0, 2, 3))
    torch.testing.assert_close(model[2].running_mean, overall.detach(), rtol=1e-10, atol=1e-12)
    for key, value in weights.items():  # nothing else moved
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p.grad is None for p in model.parameters())


def test_recalibrate_bn_restores_flags_and_momentum():
    """Train/eval flags (mixed) and each BN's momentum are what they were; (inputs, targets)
    pairs are read as inputs."""
    model = stale_cnn()
    model[2].momentum = 0.25
    model.train()
    model[1].eval()
    model[5].eval()
    flags = [m.training for m in model.modules()]
    data = images(3)
    expected = hand_statistics(model, data)
    tp.recalibrate_bn(model, [(x, torch.zeros(5)) for x in data])
    assert [m.training for m in model.modules()] == flags
    assert model[2].momentum == 0.25 and model[5].momentum == 0.3
    assert_statistics(model, expected, 3)


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_max_batches_uses_only_the_first_batches(k):
    model = stale_cnn()
    data = images(3)
    expected = hand_statistics(model, data[:k])
    tp.recalibrate_bn(model, data, max_batches=k)
    assert_statistics(model, expected, min(k, 3))


def test_max_batches_does_not_draw_a_batch_more_from_data():
    """With max_batches=2, data's third batch is never read (an invalid one raises nothing)."""
    model = stale_cnn()
    data = images(2)
    expected = hand_statistics(model, data)
    tp.recalibrate_bn(model, data + [None], max_batches=2)
    assert_statistics(model, expected, 2)


def test_untracked_batchnorm_is_left_alone():
    """A BN with track_running_stats=False keeps no statistics and is not touched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).double()
    model.eval()
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    tp.recalibrate_bn(model, images(2))
    assert model[1].running_mean is None and model[1].running_var is None
    assert model[1].state_dict().keys() == before.keys()
    assert all(torch.equal(model[1].state_dict()[k], v) for k, v in before.items())
    assert int(model[3].num_batches_tracked) == 2
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("model", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3)),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
], ids=["no-bn", "untracked-only"])
def test_model_without_tracking_batchnorm_raises(model):
    with pytest.raises(ValueError, match="no BatchNorm"):
        tp.recalibrate_bn(model().double(), images(1))


@pytest.mark.parametrize("max_batches", [0, -1, True, 1.5, "2"])
def test_bad_max_batches_raises_and_changes_nothing(max_batches):
    model = stale_cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match="`max_batches`"):
        tp.recalibrate_bn(model, images(2), max_batches=max_batches)
    assert_unchanged(model, before)


def test_not_a_module_raises_type_error():
    with pytest.raises(TypeError, match="`model`"):
        tp.recalibrate_bn({"bn": nn.BatchNorm1d(3)}, images(1))


def test_empty_data_raises_and_keeps_the_statistics():
    model = stale_cnn()
    momenta = [model[2].momentum, model[5].momentum]
    before = snapshot(model)
    with pytest.raises(ValueError, match="no batch"):
        tp.recalibrate_bn(model, [])
    assert_unchanged(model, before)
    assert [model[2].momentum, model[5].momentum] == momenta


class FailsAt(nn.Module):
    """Raises at its ``n``-th forward."""

    def __init__(self, n):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("boom")
        return x


@pytest.mark.parametrize("where", ["forward", "data"])
def test_a_failure_midway_leaves_the_statistics_as_before(where):
    """An error in the third forward pass (or a bad third batch) propagates; the running
    statistics, num_batches_tracked, momenta and flags are exactly as before the call."""
    model = stale_cnn()
    data = images(4)
    if where == "forward":
        model.append(FailsAt(3))
    else:
        data[2] = "not a batch"
    model.train()
    model[2].eval()
    before = snapshot(model)
    with pytest.raises(RuntimeError if where == "forward" else TypeError):
        tp.recalibrate_bn(model, data)
    assert_unchanged(model, before)
    assert model[2].momentum == 0.1 and model[5].momentum == 0.3


# ---------------------------------------------------------------------------------------------
# found in review: gradient criteria, resumed settings, a refused resume


def test_a_taylor_pruner_sees_the_gradients_of_each_step():
    """pruner.step() runs before the gradients are cleared: a Taylor Pruner accumulates them and
    reaches its target (it raised "no gradient statistics" when zero_grad came first)."""
    teacher = make_teacher()
    student = copy.deepcopy(teacher)
    pruner = tp.Pruner(student, 0.8, tp.schedules.Cubic(begin=2, end=10, every=2), importance="taylor")
    run(student, teacher, make_inputs(), steps=12, pruner=pruner, lr=1e-3)
    assert pruner.sparsity == pytest.approx(0.8, abs=0.01)


@pytest.mark.parametrize("change", [dict(lr=5e-3), dict(loss="mse"), dict(layers=["0"]), dict(train_mode=False),
                                    dict(teacher_cache=True)],
                         ids=["lr", "loss", "layers", "train_mode", "teacher_cache"])
def test_resume_with_other_settings_is_refused_without_change(tmp_path, change):
    """A checkpoint written with other settings (lr, loss, layers, train_mode) is refused, naming the
    setting, and the fresh student is left as it was."""
    teacher = make_teacher()
    path = tmp_path / "c.pt"
    run(pruned_copy(teacher), teacher, make_inputs(), steps=6, checkpoint=path, checkpoint_every=3)
    student = pruned_copy(teacher)
    before = state(student)
    arguments = dict(steps=6, checkpoint=path)
    arguments.update(change)
    with pytest.raises(ValueError, match=f"written with {next(iter(change))}="):
        run(student, teacher, make_inputs(), **arguments)
    assert_same_state(before, state(student))


def test_a_checkpoint_the_pruner_refuses_leaves_the_student_as_it_was(tmp_path):
    """The student's weights load before the Pruner's state; when the Pruner refuses its part (a
    Pruner over other layers), the student is put back."""
    teacher = make_teacher()
    path = tmp_path / "c.pt"
    first = copy.deepcopy(teacher)
    run(first, teacher, make_inputs(), steps=4, checkpoint=path, lr=1e-3,
        pruner=tp.Pruner(first, 0.5, tp.schedules.Cubic(begin=0, end=2, every=1)))
    student = copy.deepcopy(teacher)
    pruner = tp.Pruner(student, 0.5, tp.schedules.Cubic(begin=0, end=2, every=1), exclude=["0"])
    before = state(student)
    with pytest.raises((ValueError, RuntimeError)):
        run(student, teacher, make_inputs(), steps=4, checkpoint=path, lr=1e-3, pruner=pruner)
    assert_same_state(before, state(student))
