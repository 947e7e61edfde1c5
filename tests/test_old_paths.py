"""Module paths kept after the restructuring: what 0.2/0.3 users and their pickles name still loads."""

import pickle

import torch
from torch import nn

import torchprune as tp
from torchprune.pruner import ObservationHook


def global_reference(module: str, name: str) -> bytes:
    """A pickle (protocol 2) of ``module.name(None)``, as 0.3 wrote its Pruner's forward hook."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nN\x85R."


def test_a_pruner_hook_pickled_by_0_3_loads_inert():
    hook = pickle.loads(global_reference("torchprune.progressive", "_ObservationHook"))
    assert isinstance(hook, ObservationHook)
    assert hook(nn.Linear(2, 2), (torch.ones(1, 2),), torch.ones(1, 2)) is None  # observes nothing


def test_a_model_pickled_while_a_pruner_observes_it_loads():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    tp.Pruner(model, 0.5, tp.schedules.Cubic(begin=0, end=4, every=1), importance="activation")
    copy = pickle.loads(pickle.dumps(model))
    x = torch.randn(3, 4)
    torch.testing.assert_close(copy(x), model(x), rtol=0, atol=0)


def test_torchprune_sensitivity_module_path():
    from torchprune.sensitivity import Sensitivity, allocate, sensitivity

    assert sensitivity is tp.sensitivity and allocate is tp.allocate
    assert pickle.loads(b"\x80\x02ctorchprune.sensitivity\nSensitivity\n.") is Sensitivity
