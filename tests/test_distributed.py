"""Pruning under DistributedDataParallel: two gloo processes on different data keep equal masks.

Starting two processes costs seconds (each imports torch), so one module-scoped spawn runs every
two-rank scenario in turn and records each one's outcome per rank; every test then checks its own
scenario. The workers compare their masks with the other rank themselves (all_gather of the mask
bytes, independent of the Pruner's own checksum).
"""

import copy
import datetime
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torchprune as tp
from torchprune import distributed
from torchprune.calibration import observe_activations
from torchprune.schedules import Cubic

from conftest import make_mlp

WORLD = 2
COLLECTIVE_TIMEOUT = 20  # seconds: a rank stuck in a collective after the other failed gives up
SPAWN_TIMEOUT = 120  # seconds for all scenarios; a hang fails the tests instead of blocking the suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, scenarios, folder):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    outcomes = {}
    try:
        for name, (scenario, args) in scenarios.items():
            try:
                scenario(rank, *args)
                outcomes[name] = "ok"
            except BaseException:  # recorded for the test of this scenario; the others still run
                outcomes[name] = traceback.format_exc()
            with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
                json.dump(outcomes, f)
    finally:
        dist.destroy_process_group()


def _spawn(scenarios, folder):
    """Runs every ``scenario(rank, *args)`` in two gloo processes; kills them after SPAWN_TIMEOUT.

    The processes are forked: a spawned one re-imports torch, and DDP's first construction imports
    torch._dynamo, seconds each on a busy machine; forked ones inherit both from this process.
    """
    import torch._dynamo  # noqa: F401  (imported once here rather than in every rank)

    context = mp.start_processes(_worker, args=(_free_port(), scenarios, str(folder)), nprocs=WORLD, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        while not context.join(timeout=1.0) and time.monotonic() < deadline:
            pass
    except mp.ProcessRaisedException:
        pass  # outcomes are in the files
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    outcomes = []
    for rank in range(WORLD):
        path = folder / f"rank{rank}.json"
        outcomes.append(json.loads(path.read_text()) if path.exists() else {})
    return outcomes


def _batches(rank, n):
    """Different data on every rank."""
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _assert_same_on_every_rank(masks):
    """All-gathers the masks' bytes and checks every rank holds what rank 0 holds."""
    flat = torch.cat([m.reshape(-1) for m in masks.values()]).to(torch.uint8)
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    for other in gathered[1:]:
        assert torch.equal(other, gathered[0]), "masks differ across ranks"


def _train_and_compare(rank, importance, wrap_first, with_data=False):
    torch.manual_seed(0)
    model = make_mlp()  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    schedule = Cubic(begin=1, end=9, every=2)
    extra = dict(data=_batches(rank + 10, 2), loss_fn=F.cross_entropy) if with_data else {}  # per-rank `data`
    if wrap_first:  # the Pruner takes the DDP wrapper ...
        ddp = DistributedDataParallel(model)
        pruner = tp.Pruner(ddp, 0.8, schedule, importance=importance, scope="global", **extra)
    else:  # ... or its module, and DDP may wrap a model that already has masks
        pruner = tp.Pruner(model, 0.8, schedule, importance=importance, scope="global", **extra)
        ddp = DistributedDataParallel(model)
    assert pruner.model is model
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    updates = 0
    for x, y in _batches(rank, 12):
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        if pruner.step():
            updates += 1
            _assert_same_on_every_rank(tp.masks(model))
    assert updates == 4  # steps 3, 5, 7, 9 (the schedule is still at 0 at step 1)
    total = sum(m.numel() for m in tp.masks(model).values())
    pruned = sum(int((~m).sum()) for m in tp.masks(model).values())
    assert pruned == round(0.8 * total)  # the exact global count, on every rank
    for layer in model:
        if hasattr(layer, "weight_mask"):
            assert (layer.weight[~layer.weight_mask] == 0).all()
    _assert_same_on_every_rank({name: p.detach().view(torch.uint8) for name, p in model.named_parameters()})


def _channel_pruner_with_data(rank):
    torch.manual_seed(0)
    model = make_mlp()
    ddp = DistributedDataParallel(model)
    pruner = tp.Pruner(ddp, 0.5, Cubic(begin=0, end=4, every=2), importance="taylor", scope="global",
                       granularity="channel", example_inputs=torch.zeros(1, 16),
                       data=_batches(rank + 10, 2), loss_fn=F.cross_entropy)  # a different `data` per rank
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for x, y in _batches(rank, 6):
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        if pruner.step():
            removed = pruner.removed_channels()
            gathered = [None] * WORLD
            dist.all_gather_object(gathered, removed)
            assert all(g == gathered[0] for g in gathered)
    assert pruner.sparsity == 28 / 56


def _statistics_are_averaged(rank):
    """What the Pruner ranks on under DDP equals one process observing every rank's data."""
    torch.manual_seed(0)
    model = make_mlp()
    layers = {name: m for name, m in model.named_children() if isinstance(m, nn.Linear)}
    local, everything = tp.importance.Activation("apoz"), tp.importance.Activation("apoz")
    observe_activations(model, layers, local, _batches(rank, 3))
    for other in range(WORLD):
        observe_activations(model, layers, everything, _batches(other, 3))
    assert not torch.equal(local.score(layers["0"]), everything.score(layers["0"]))
    distributed.average_importance_state(local, layers)
    for layer in layers.values():
        torch.testing.assert_close(local.score(layer), everything.score(layer), rtol=1e-12, atol=0)


def _diverged_mask_is_named(rank):
    torch.manual_seed(0)
    model = make_mlp()
    ddp = DistributedDataParallel(model)
    pruner = tp.Pruner(ddp, 0.5, Cubic(begin=0, end=2, every=2))
    if rank == 1:  # one rank's copy drifts: the largest weight of layer '2' pruned there only
        with torch.no_grad():
            model[2].weight_mask.view(-1)[model[2].weight.abs().argmax()] = False
    error = None
    try:
        for _ in range(3):  # the update at step 2 (sparsity 0 at step 0)
            pruner.step()
    except RuntimeError as e:
        error = str(e)
    assert error is not None and "differ across ranks" in error and "['2']" in error, error
    assert "'0'" not in error.split("in ['2']")[0]  # only the diverged layer is named


def _helper_names_layers_and_steps(rank):
    same = torch.ones(3, 4, dtype=torch.bool)
    different = torch.ones(5, dtype=torch.bool)
    different[rank] = False  # the same count kept, different positions
    distributed.check_equal_across_ranks({"a": same}, step=3)  # equal: no error
    with pytest.raises(RuntimeError, match=r"differ across ranks after the update at step 3 in \['b'\].*'b': \[4, 4\]"):
        distributed.check_equal_across_ranks({"a": same, "b": different}, step=3)
    with pytest.raises(RuntimeError, match=r"different steps \[3, 4\]"):
        distributed.check_equal_across_ranks({"a": same}, step=3 + rank)


def _resume_per_rank(rank):
    """Each rank checkpoints its own model, optimizer and Pruner between two updates (the activation
    statistics seen so far are that rank's own), resumes in fresh objects and ends like the run
    that never stopped."""
    data = _batches(rank, 12)

    def run(start, stop, state=None):
        torch.manual_seed(0)
        model = make_mlp()
        ddp = DistributedDataParallel(model)
        pruner = tp.Pruner(ddp, 0.8, Cubic(begin=1, end=9, every=2), importance="activation", scope="global")
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            pruner.load_state_dict(state["pruner"])
        for x, y in data[start:stop]:
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            pruner.step()
        assert pruner.state_dict()["importance"] or stop == 12  # stopped between updates: statistics pending
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "pruner": pruner.state_dict()}

    straight = run(0, 12)["model"]
    resumed = run(5, 12, copy.deepcopy(run(0, 5)))["model"]  # steps 0-4: between the updates at 3 and 5
    assert set(straight) == set(resumed)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    _assert_same_on_every_rank({k: v for k, v in resumed.items() if k.endswith("weight_mask")})


def _one_rank_without_data_fails_on_every_rank(rank):
    """Rank 1's own `data` is empty: it raises its ValueError and rank 0 a RuntimeError naming rank 1,
    at once, instead of rank 0 waiting in the statistics all_reduce that rank 1 never joins."""
    torch.manual_seed(0)
    model = make_mlp()
    data = [] if rank == 1 else _batches(rank, 1)
    pruner = tp.Pruner(model, 0.5, Cubic(begin=0, end=2, every=1), importance="activation", data=data)
    started = time.monotonic()
    expected = (ValueError, "yielded no batches") if rank == 1 else (RuntimeError, r"failed on rank\(s\) \[1\]")
    with pytest.raises(expected[0], match=expected[1]):
        for _ in range(3):
            pruner.step()
    assert time.monotonic() - started < COLLECTIVE_TIMEOUT / 2  # no wait for the collective timeout
    assert all(bool(m.all()) for m in tp.masks(model).values())  # nothing pruned on either rank
    _assert_same_on_every_rank(tp.masks(model))  # the ranks are still in step for the next collective


def _channel_rank_without_data_fails_on_every_rank(rank):
    """The same for the channel Pruner: its group scoring on an empty `data` fails on rank 1 only."""
    torch.manual_seed(0)
    model = make_mlp()
    data = [] if rank == 1 else _batches(rank, 1)
    pruner = tp.Pruner(model, 0.5, Cubic(begin=0, end=2, every=1), importance="taylor", granularity="channel",
                       example_inputs=torch.zeros(1, 16), data=data, loss_fn=F.cross_entropy)
    started = time.monotonic()
    expected = (ValueError, "no batches") if rank == 1 else (RuntimeError, r"failed on rank\(s\) \[1\]")
    with pytest.raises(expected[0], match=expected[1]):
        for _ in range(3):
            pruner.step()
    assert time.monotonic() - started < COLLECTIVE_TIMEOUT / 2
    assert not any(pruner.removed_channels().values())  # nothing zeroed on either rank


def _fsdp2_is_refused(rank):
    from torch.distributed.fsdp import fully_shard

    model = make_mlp()
    fully_shard(model)  # runs on CPU with gloo (FSDP1 needs an accelerator); weights become DTensor shards
    with pytest.raises(TypeError, match="FSDP-sharded module \\(the model itself, FSDPSequential\\)"):
        tp.Pruner(model, 0.5, Cubic(begin=0, end=2, every=2))
    assert not tp.masks(model)


SCENARIOS = {
    "magnitude": (_train_and_compare, ("magnitude", True)),
    "taylor": (_train_and_compare, ("taylor", False)),
    "activation": (_train_and_compare, ("activation", True)),
    "wanda": (_train_and_compare, ("wanda", False)),
    "gradient-data": (_train_and_compare, ("gradient", True, True)),
    "channel": (_channel_pruner_with_data, ()),
    "averaged": (_statistics_are_averaged, ()),
    "diverged": (_diverged_mask_is_named, ()),
    "helper": (_helper_names_layers_and_steps, ()),
    "resume": (_resume_per_rank, ()),
    "fsdp2": (_fsdp2_is_refused, ()),
    "no-data-on-one-rank": (_one_rank_without_data_fails_on_every_rank, ()),
    "channel-no-data-on-one-rank": (_channel_rank_without_data_fails_on_every_rank, ()),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Per rank, {scenario: "ok" or the traceback}, from one two-process spawn."""
    return _spawn(SCENARIOS, tmp_path_factory.mktemp("ranks"))


def _check(outcomes, name):
    for rank, outcome in enumerate(outcomes):
        assert name in outcome, f"rank {rank} never finished scenario {name!r} (hung or crashed)"
        assert outcome[name] == "ok", f"rank {rank}:\n{outcome[name]}"


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "activation", "wanda", "gradient-data"])
def test_ddp_ranks_on_different_data_keep_equal_masks_and_exact_sparsity(outcomes, importance):
    _check(outcomes, importance)


def test_channel_pruner_with_different_data_per_rank_keeps_equal_channels(outcomes):
    _check(outcomes, "channel")


def test_statistics_averaged_over_ranks_equal_one_process_on_all_data(outcomes):
    _check(outcomes, "averaged")


def test_diverged_masks_raise_naming_the_layer_on_every_rank(outcomes):
    _check(outcomes, "diverged")


def test_checksum_helper_names_the_layers_and_steps(outcomes):
    _check(outcomes, "helper")


def test_each_rank_resumes_from_its_own_checkpoint_like_the_uninterrupted_run(outcomes):
    _check(outcomes, "resume")


def test_a_rank_whose_data_fails_makes_every_rank_raise_without_hanging(outcomes):
    _check(outcomes, "no-data-on-one-rank")


def test_a_rank_whose_channel_scoring_fails_makes_every_rank_raise_without_hanging(outcomes):
    _check(outcomes, "channel-no-data-on-one-rank")


def test_fsdp2_sharded_model_is_refused_with_the_reason(outcomes):
    _check(outcomes, "fsdp2")


def test_without_process_group_nothing_is_synced():
    assert not distributed.is_distributed()
    masks = {"a": torch.ones(2, dtype=torch.bool)}
    distributed.check_equal_across_ranks(masks, step=0)  # no collective, no error
    value = torch.ones(3)
    distributed.average_([value])
    assert torch.equal(value, torch.ones(3))


def test_mask_digest_tells_masks_apart():
    a = torch.zeros(4, 8, dtype=torch.bool)
    b = a.clone()
    b[3, 7] = True
    assert distributed.mask_digest(a) == distributed.mask_digest(a.clone())
    assert distributed.mask_digest(a) != distributed.mask_digest(b)
    assert distributed.mask_digest(a) != distributed.mask_digest(a.reshape(8, 4))  # the shape counts


def test_fsdp_models_are_refused_with_the_reason():
    class FullyShardedDataParallel(nn.Module):  # stands in for torch's FSDP wrapper (checked by name)
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(TypeError, match="FSDP-sharded module.*whole on every rank"):
        tp.Pruner(nn.Sequential(FullyShardedDataParallel(make_mlp())), 0.5, Cubic(begin=0, end=2, every=2))
