"""Keeping pruning state equal across the ranks of a distributed (DistributedDataParallel) run.

Under DDP every rank holds a full copy of the model and must prune exactly the same weights, or
the copies stop being copies. Weights and DDP-averaged gradients are already equal on every rank,
but what a data-driven criterion observes on its own rank's batches (activation, APoZ and Wanda
statistics, gradient sums kept outside DDP's all-reduce, scores on the Pruner's own ``data``) is
not: the Pruner averages those across ranks before ranking (`average_importance_state`,
`average_`). After every mask update it compares a 64-bit digest of each mask across ranks
(`check_equal_across_ranks`) and raises naming the layers that differ, rather than train on
silently diverged copies.

Everything here is a no-op unless ``torch.distributed`` is initialized with more than one rank.
The collectives (all_reduce SUM, all_gather) exist in gloo and nccl; tensors go to the device the
backend needs (CPU for gloo, the current CUDA device for nccl) and back.

>>> model = DistributedDataParallel(net)
>>> pruner = tp.Pruner(model, 0.9, schedule, importance="taylor")   # the same call on every rank
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_distributed", "unwrap", "average_", "average_importance_state", "mask_digest",
           "check_equal_across_ranks", "fail_together"]


def is_distributed() -> bool:
    """True when torch.distributed is initialized with more than one rank (then the Pruner syncs)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap(model: nn.Module, argument: str = "model") -> nn.Module:
    """The module a DistributedDataParallel wrapper holds (``model`` itself otherwise).

    FSDP shards each weight across ranks, so no rank holds the whole weight a mask must cover and
    rank: FSDP models are refused with an explanation instead of pruning shards independently.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "FullyShardedDataParallel" or any(base.__name__ == "FSDPModule" for base in type(module).__mro__):
            where = repr(name) if name else "the model itself"
            raise TypeError(
                f"`{argument}` contains an FSDP-sharded module ({where}, {kind}); the Pruner needs "
                "each pruned weight whole on every rank to rank and mask it: wrap the model with "
                "DistributedDataParallel, or prune before sharding"
            )
    return model


@contextlib.contextmanager
def fail_together(what: str) -> Iterator[None]:
    """Runs the block on every rank; if it raises on some ranks (a rank's own `data` was empty, or
    never reached a layer), the others raise a RuntimeError naming those ranks instead of going on
    to a collective the failed ranks never join (a hang until the backend's timeout)."""
    if not is_distributed():
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # re-raised below, once every rank knows
        error = e
    flags = torch.tensor([error is not None], dtype=torch.int64)
    device = _collective_device(flags)
    gathered = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flags.to(device))
    failed = [rank for rank, flag in enumerate(gathered) if int(flag)]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{what} failed on rank(s) {failed} (see the error there), so this rank stops too")


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """Where the default backend can reduce ``tensor``: CPU for gloo, the current CUDA device for
    nccl, the tensor's own device for a backend that serves several devices."""
    backend = str(dist.get_backend()).lower()
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def average_(tensors: Sequence[torch.Tensor]) -> None:
    """Replaces each floating-point tensor by its mean over all ranks, in place (one all_reduce per
    dtype and device). Every rank must pass tensors of the same shapes in the same order."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    buckets: Dict[tuple, List[torch.Tensor]] = {}
    for tensor in tensors:
        if not tensor.is_floating_point():
            raise TypeError(f"average_ takes floating-point tensors, got {tensor.dtype}")
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for members in buckets.values():
        flat = torch.cat([t.detach().reshape(-1) for t in members]).to(_collective_device(members[0]))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # AVG is nccl-only
        flat.div_(world)
        offset = 0
        for t in members:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def average_importance_state(criterion, layers: Dict[str, nn.Module]) -> None:
    """Averages a data-driven criterion's accumulated statistics (its ``state_dict``) over all ranks.

    Sums and counts are averaged alike, so ratios (a mean activation, the fraction of zeros) become
    those over every rank's data. A layer observed on some ranks but not all (a forward that differs
    between ranks) is named in a RuntimeError raised on every rank alike.
    """
    if not is_distributed():
        return
    state = criterion.state_dict(layers)
    names = list(layers)
    present = torch.tensor([name in state for name in names], dtype=torch.int64)
    device = _collective_device(present)
    counts = present.to(device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    counts = counts.cpu()
    world = dist.get_world_size()
    partial = [name for name, n in zip(names, counts.tolist()) if 0 < n < world]
    if partial:
        raise RuntimeError(
            f"layers {partial} were observed by {type(criterion).__name__} on some ranks but not on others "
            f"({world} ranks): every rank's training step must run (and backpropagate through) the same layers"
        )
    tensors = []
    for name in names:
        if name in state:
            value = state[name]  # a tensor (gradient sums) or a dict of them (forward statistics)
            tensors.extend([value[k] for k in sorted(value)] if isinstance(value, dict) else [value])
    average_([t for t in tensors if t.is_floating_point()])
    criterion.load_state_dict(state, layers)


def mask_digest(mask: torch.Tensor) -> int:
    """A 64-bit digest (blake2b) of a bool mask's shape and bits: equal masks give equal digests and
    different ones, in practice, different digests. The mask is copied to the CPU once (1 bit per
    weight hashed), which is cheap next to the training steps between two updates."""
    bits = np.packbits(mask.detach().to(device="cpu", dtype=torch.bool).contiguous().numpy().reshape(-1))
    digest = hashlib.blake2b(bits.tobytes(), digest_size=8)
    digest.update(repr(tuple(mask.shape)).encode())
    return int.from_bytes(digest.digest(), "little", signed=True)


def check_equal_across_ranks(masks: Dict[str, torch.Tensor], step: int, what: str = "masks") -> None:
    """Raises RuntimeError on every rank, naming the layers, if ``masks`` (by layer name) differ
    between ranks; compares the step count and the layer names too. One all_gather of
    (digest, kept count) per layer, after a small header exchange that checks both sizes agree."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    names = list(masks)
    names_digest = int.from_bytes(hashlib.blake2b("\0".join(names).encode(), digest_size=8).digest(), "little",
                                  signed=True)
    header = torch.tensor([step, len(names), names_digest], dtype=torch.int64)
    device = _collective_device(header)
    headers = [torch.empty(3, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(headers, header.to(device))
    headers = [h.cpu().tolist() for h in headers]
    if any(h[0] != step for h in headers):
        raise RuntimeError(f"the ranks updated their {what} at different steps {[h[0] for h in headers]} (rank order): "
                           "every rank must call Pruner.step() once per training step and resume from the same "
                           "checkpoint")
    if any(h[1:] != headers[0][1:] for h in headers):
        raise RuntimeError(f"the ranks prune different layers ({[h[1] for h in headers]} layers, rank order): "
                           "build the Pruner with the same model and arguments on every rank")
    local = torch.tensor([[mask_digest(m), int(m.sum())] for m in masks.values()], dtype=torch.int64).reshape(-1, 2)
    gathered = [torch.empty_like(local, device=device) for _ in range(world)]
    dist.all_gather(gathered, local.to(device))
    gathered = [g.cpu() for g in gathered]
    differ = [i for i in range(len(names)) if any(not torch.equal(g[i], gathered[0][i]) for g in gathered[1:])]
    if differ:
        kept = "; ".join(f"{names[i]!r}: {[int(g[i, 1]) for g in gathered]}" for i in differ)
        raise RuntimeError(
            f"{what} differ across ranks after the update at step {step} in {[names[i] for i in differ]} (kept entries "
            f"per rank: {kept}): the ranks' weights or scores diverged; train every rank's copy with "
            "DistributedDataParallel and the same Pruner arguments"
        )
