"""save()/load(): plain-tensor files that bring a fresh model back pruned, in another process too."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torchprune as tp

from conftest import SmallNet

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_round_trip_into_fresh_instance(small_net, tmp_path):
    tp.prune(small_net, sparsity=0.8, scope="global", exclude=["fc2"])
    path = tmp_path / "pruned.pt"
    tp.save(small_net, path)
    payload = torch.load(path, weights_only=True)  # plain tensors and data only
    assert set(payload["masked_layers"]) == {"conv", "conv1d", "fc1"}
    fresh = tp.load(path, SmallNet())
    small_net.eval(), fresh.eval()
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(fresh(x), small_net(x))
    assert ({k: v.tolist() for k, v in tp.masks(fresh).items()}
            == {k: v.tolist() for k, v in tp.masks(small_net).items()})
    assert type(fresh.fc2) is nn.Linear


def test_load_in_another_process(small_net, tmp_path):
    tp.prune(small_net, granularity="2:4", exclude=["conv"])
    small_net.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.save(x, tmp_path / "x.pt")
    torch.save(small_net(x).detach(), tmp_path / "y.pt")
    tp.save(small_net, tmp_path / "model.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {TESTS!r})
        import torchprune as tp
        from conftest import SmallNet
        model = tp.load({str(tmp_path / "model.pt")!r}, SmallNet()).eval()
        x, y = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "y.pt")!r})
        assert torch.equal(model(x), y), "outputs differ"
        assert abs(tp.sparsity(model) - {tp.sparsity(small_net)!r}) < 1e-12
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_load_checks_everything_before_changing_the_model(small_net, tmp_path):
    tp.prune(small_net, sparsity=0.5)
    tp.save(small_net, tmp_path / "m.pt")
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="the file masks a Conv2d at 'conv'"):
        tp.load(tmp_path / "m.pt", other)
    assert type(other[0]) is nn.Linear

    class Wider(SmallNet):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(32, 12)

    wider = Wider()
    with pytest.raises(ValueError, match=r"shape differs: fc2.bias \[10\] vs \[12\]"):
        tp.load(tmp_path / "m.pt", wider)
    assert not tp.masks(wider)

    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a torchprune file"):
        tp.load(tmp_path / "plain.pt", SmallNet())


def test_save_load_of_unpruned_model(tmp_path):
    model = SmallNet()
    tp.save(model, tmp_path / "dense.pt")
    fresh = tp.load(tmp_path / "dense.pt", SmallNet())
    assert not tp.masks(fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_load_refuses_unsupported_devices_before_any_change(small_net, tmp_path):
    tp.prune(small_net, sparsity=0.5)
    tp.save(small_net, tmp_path / "m.pt")
    target = SmallNet()
    target.fc1.to("meta")
    with pytest.raises(ValueError, match=r"`model` layer 'fc1' is on meta"):
        tp.load(tmp_path / "m.pt", target)
    assert not tp.masks(target)


def test_not_a_torch_file_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is not a torchprune file"):
        tp.load(tmp_path / "notes.txt", SmallNet())
    torch.save({"format": "torchprune"}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="is not a torchprune file"):
        tp.load(tmp_path / "partial.pt", SmallNet())


class AliasNet(nn.Module):
    """One Linear registered under two names, as `self.classifier = self.fc` does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.classifier = self.fc
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.classifier(x)))


def test_aliased_module_round_trips(tmp_path):
    model = AliasNet()
    tp.prune(model, sparsity=0.5)
    tp.save(model, tmp_path / "alias.pt")
    fresh = tp.load(tmp_path / "alias.pt", AliasNet())
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))
    assert fresh.fc is fresh.classifier and tp.masks(fresh).keys() == tp.masks(model).keys()


class ExtraStateNet(SmallNet):
    """A model with non-tensor extra state in its state_dict."""

    def get_extra_state(self):
        return {"note": "calibrated", "steps": 3}

    def set_extra_state(self, state):
        self.restored = state


def test_extra_state_is_saved(tmp_path):
    model = ExtraStateNet()
    tp.prune(model, sparsity=0.5)
    tp.save(model, tmp_path / "extra.pt")
    fresh = tp.load(tmp_path / "extra.pt", ExtraStateNet())
    assert fresh.restored == {"note": "calibrated", "steps": 3}


class VersionChecked(nn.Module):
    """Refuses a state_dict without its module's version, as torchvision's MNASNet does."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        self.loaded_version = version
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class VersionedBlock(VersionChecked):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class VersionedNet(VersionChecked):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = VersionedBlock()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("pruning", ["masks", "channels"])
def test_state_dict_metadata_round_trips(pruning, tmp_path):
    torch.manual_seed(0)
    model, x = VersionedNet().eval(), torch.randn(2, 3, 6, 6)
    if pruning == "channels":
        tp.prune(model, sparsity=0.5, granularity="channel", example_inputs=x)
    tp.prune(model, sparsity=0.5)
    tp.save(model, tmp_path / "v.pt")
    fresh = tp.load(tmp_path / "v.pt", VersionedNet()).eval()
    assert fresh.loaded_version == 2 and fresh.block.loaded_version == 2
    payload = torch.load(tmp_path / "v.pt", weights_only=True)  # plain data
    assert payload["metadata"][""] == {"version": 2} and payload["metadata"]["block.bn"] == {"version": 2}
    assert torch.equal(fresh(x), model(x))
    assert tp.masks(fresh).keys() == tp.masks(model).keys()


def test_file_without_metadata_still_loads(small_net, tmp_path):
    """Files written before the metadata was kept load as they did (without it)."""
    tp.prune(small_net, sparsity=0.5)
    tp.save(small_net, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload.pop("metadata", None)  # as files written before the metadata was kept
    torch.save(payload, tmp_path / "old.pt")
    fresh = tp.load(tmp_path / "old.pt", SmallNet())
    small_net.eval(), fresh.eval()
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(fresh(x), small_net(x))
    assert tp.masks(fresh).keys() == tp.masks(small_net).keys()
