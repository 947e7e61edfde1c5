"""Masked layers: forward semantics, optimizer behaviour, copying, making permanent."""

import copy
import pickle

import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.masking import attach_mask, get_mask, remove_mask

from conftest import SmallNet
from error_bounds import assert_close_bounded, assert_layer_close, assert_same_function, layer_grad_references


def random_mask(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def masked_copy(layer):
    """A plain layer with the masked weights, as the reference."""
    ref = copy.deepcopy(layer)
    if get_mask(ref) is not None:
        with torch.no_grad():
            ref.weight.mul_(ref.weight_mask)
        remove_mask(ref)
    return ref


LAYERS = [
    lambda: nn.Linear(7, 5),
    lambda: nn.Linear(7, 5, bias=False),
    lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect", bias=False),
    lambda: nn.Conv2d(4, 8, (2, 3), padding="same", dilation=2, groups=2),
    lambda: nn.Conv2d(4, 4, 3, padding=2, padding_mode="circular", groups=4),
    lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
    lambda: nn.Conv1d(4, 6, 4, padding="same", padding_mode="replicate"),
    lambda: nn.Conv1d(4, 6, 3, padding="valid", dilation=2),
]
INPUTS = {nn.Linear: (3, 7), nn.Conv2d: (2, 4, 9, 8), nn.Conv1d: (2, 4, 11)}


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_masked_forward_and_backward_match_plain_layer(make, density):
    torch.manual_seed(0)
    layer = make()
    attach_mask(layer, random_mask(layer.weight.shape, density))
    assert isinstance(layer, type(masked_copy(layer)))
    reference = masked_copy(layer)
    x = torch.randn(INPUTS[type(reference)]).requires_grad_()
    out = layer(x)
    grad_out = torch.randn(out.shape)
    out.backward(grad_out)
    # the plain layer in float64 is the reference; kernels sum in their own order (error_bounds.py)
    (want, want_x, want_w), (mag, mag_x, mag_w), (terms, terms_x, terms_w) = layer_grad_references(
        reference, x, grad_out)
    assert_close_bounded(out, want, mag, terms, torch.float32, "output")
    assert_close_bounded(x.grad, want_x, mag_x, terms_x, torch.float32, "grad_x")
    mask = layer.weight_mask
    assert (layer.weight.grad[~mask] == 0).all()
    assert_close_bounded(layer.weight.grad[mask], want_w[mask], mag_w[mask], terms_w[mask], torch.float32,
                         "grad_weight")
    # unbatched input works like torch's layers
    if not isinstance(layer, nn.Linear):
        assert_layer_close(layer(x[0].detach()), reference, x[0])


def test_state_dict_keeps_plain_keys_and_adds_mask():
    layer = nn.Linear(4, 3)
    attach_mask(layer, random_mask((3, 4), 0.5))
    assert list(layer.state_dict()) == ["weight", "bias", "weight_mask"]
    assert layer.weight_mask.dtype == torch.bool


def _train(model, optimizer, steps=5, seed=0):
    torch.manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 4, 4)).logsumexp(1).sum().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
        lambda p: torch.optim.AdamW(p, lr=0.01),
        lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    ],
)
def test_pruned_weights_stay_zero_through_optimizers(small_net, make_optimizer):
    optimizer = make_optimizer(small_net.parameters())
    _train(small_net, optimizer)  # momentum / moments are non-zero everywhere before pruning
    tp.prune(small_net, sparsity=0.8, scope="global")
    kept_before = {n: small_net.get_submodule(n).weight.detach().clone() for n in tp.masks(small_net)}
    _train(small_net, optimizer, seed=1)
    for name, mask in tp.masks(small_net).items():
        weight = small_net.get_submodule(name).weight
        assert (weight[~mask] == 0).all(), name
        assert not torch.equal(weight[mask], kept_before[name][mask]), name  # the rest still trains
        for value in optimizer.state[weight].values():
            if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                assert (value[~mask] == 0).all()


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copies_stay_pruned_and_enforced(small_net, clone):
    tp.prune(small_net, sparsity=0.5)
    twin = clone(small_net)
    x = torch.randn(2, 3, 4, 4)
    small_net.eval(), twin.eval()
    assert torch.equal(twin(x), small_net(x))
    twin.train()
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    _train(twin, optimizer)
    with torch.no_grad():  # even weights written by hand are re-zeroed at the next step
        twin.fc1.weight.fill_(1.0)
    _train(twin, optimizer, steps=1)
    assert (twin.fc1.weight[~twin.fc1.weight_mask] == 0).all()


def test_masked_classes_are_tp_nn_and_keep_their_old_import_path():
    import torchprune.masking as masking

    for name in ("MaskedLinear", "MaskedConv1d", "MaskedConv2d"):
        assert getattr(masking, name) is getattr(tp.nn, name)
    assert masking.get_mask is tp.nn.masked.get_mask


@pytest.mark.parametrize("old_path", [b"torchprune.masking", b"torchprune.nn.masked"])
def test_pickles_naming_the_old_module_path_still_load(small_net, old_path):
    """Pickles written before the masked layers moved to torchprune.nn.masked name
    torchprune.masking.MaskedLinear etc.; they still load, masked and enforced."""
    tp.prune(small_net, sparsity=0.5)
    data = pickle.dumps(small_net, protocol=2)  # protocol 2 names classes as text: "c<module>\n<name>\n"
    assert data.count(b"ctorchprune.nn.masked\n") == 3
    twin = pickle.loads(data.replace(b"ctorchprune.nn.masked\n", b"c" + old_path + b"\n"))
    x = torch.randn(2, 3, 4, 4)
    small_net.eval(), twin.eval()
    assert torch.equal(twin(x), small_net(x))
    assert type(twin.fc1) is tp.nn.MaskedLinear and type(twin.conv1d) is tp.nn.MaskedConv1d
    twin.train()
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        twin.conv.weight.fill_(1.0)
    _train(twin, optimizer, steps=1)
    assert (twin.conv.weight[~twin.conv.weight_mask] == 0).all()


def test_make_permanent_gives_plain_layers_with_same_outputs(small_net):
    tp.prune(small_net, sparsity=0.75, scope="global")
    small_net.eval()
    x = torch.randn(2, 3, 4, 4)
    before = copy.deepcopy(small_net)
    assert tp.make_permanent(small_net) is small_net
    assert not tp.masks(small_net)
    assert all(type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d) for m in (small_net.conv, small_net.conv1d, small_net.fc1))
    assert_same_function(small_net, before, x)
    assert abs(tp.sparsity(small_net) - 0.75) < 1e-3
    fresh = SmallNet()
    fresh.load_state_dict(small_net.state_dict())  # strict: no mask keys remain


def test_sparsity_counts_masked_and_zero_weights(mlp):
    assert tp.sparsity(mlp) == 0.0
    total = sum(m.weight.numel() for m in mlp if isinstance(m, nn.Linear))
    with torch.no_grad():
        mlp[0].weight[0].zero_()
    assert tp.sparsity(mlp) == 16 / total
    assert tp.sparsity(nn.ReLU()) == 0.0


def test_attach_mask_errors():
    with pytest.raises(TypeError, match="`module` must be one of"):
        attach_mask(nn.BatchNorm1d(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`mask` must have the weight's shape \[3, 4\]"):
        attach_mask(nn.Linear(4, 3), torch.ones(4, 3, dtype=torch.bool))


def test_autocast_mixes_pruned_and_unpruned_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    tp.prune(model, sparsity=0.5, exclude=["5"])
    reference = masked_copy_model(model)
    x = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(x), reference(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    out.float().sum().backward()
    for layer in (model[0], model[3]):
        assert layer.weight.grad.dtype == torch.float32
        assert (layer.weight.grad[~layer.weight_mask] == 0).all()


def masked_copy_model(model):
    """A plain copy of a pruned model: masked weights zeroed, masks dropped."""
    return tp.make_permanent(copy.deepcopy(model))
