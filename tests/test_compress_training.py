"""What the compress command's recovery trains (compress/training.py): a copy on the sparse kernels
from SPARSE_FROM up (or as asked), embeddings frozen, and the trained values written back into the
masked student, which then computes what the trained copy computes and keeps its masks."""

import copy

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.compress import training
from torchprune.masking import masked_fraction
from torchprune.nn.sparse import SparseLayer


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.embed(ids))))


def pruned(sparsity=0.8, seed=0):
    torch.manual_seed(seed)
    model = Tagger()
    tp.prune(model, sparsity, scope="layer")
    return model, torch.randint(0, 50, (4, 7))


@pytest.mark.parametrize("on, sparsity, sparse", [("auto", 0.8, True), ("auto", training.SPARSE_FROM, True),
                                                   ("auto", 0.5, False), ("sparse", 0.5, True),
                                                   ("masked", 0.9, False)])
def test_the_copy_is_sparse_when_asked_or_from_the_threshold(on, sparsity, sparse):
    model, ids = pruned(sparsity)
    before = copy.deepcopy(model.state_dict())
    trained = training.training_copy(model, sparsity, on, (ids,))
    assert (trained is not model) == sparse
    assert any(isinstance(m, SparseLayer) for m in trained.modules()) == sparse
    for key, value in model.state_dict().items():  # the student itself is not changed
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        torch.testing.assert_close(trained(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_a_bad_choice_is_refused():
    model, ids = pruned()
    with pytest.raises(ValueError, match="`on` must be one of"):
        training.training_copy(model, 0.8, "dense", (ids,))


def test_freeze_and_restore_embeddings():
    model, _ = pruned()
    frozen = training.freeze_embeddings(model)
    assert frozen == [model.embed.weight] and not model.embed.weight.requires_grad
    assert model.fc1.weight.requires_grad
    assert training.freeze_embeddings(model) == []  # already frozen: nothing to give back twice
    training.restore_grad(frozen)
    assert model.embed.weight.requires_grad


def test_copy_back_gives_the_student_the_trained_function_and_keeps_its_masks():
    model, ids = pruned(0.8)
    masks = {name: mask.clone() for name, mask in tp.masks(model).items()}
    trained = training.training_copy(model, 0.8, "sparse", (ids,))
    frozen = training.freeze_embeddings(trained)
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        trained(ids).square().mean().backward()
        optimizer.step()
    training.restore_grad(frozen)
    embedding = model.embed.weight.detach().clone()
    training.copy_back(trained, model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), trained(ids), rtol=1e-5, atol=1e-6)
    assert torch.equal(model.embed.weight, embedding)  # frozen: unchanged
    for name, mask in tp.masks(model).items():
        assert torch.equal(mask, masks[name]), name
        assert not model.get_submodule(name).weight[~mask].any(), name  # pruned entries stay zero
    assert masked_fraction(model) == pytest.approx(0.8, abs=0.01)


def test_copy_back_of_the_student_itself_changes_nothing():
    model, ids = pruned()
    state = copy.deepcopy(model.state_dict())
    training.copy_back(model, model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
