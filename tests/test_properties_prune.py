"""Property-based tests (hypothesis) of tp.prune() on random small MLPs and conv nets.

Each case draws an architecture (layer widths, kernel sizes, BatchNorm or not), a dtype, weights
(continuous, or quantized so that many scores tie, zeros included), a sparsity (0 included), a
granularity and a scope, and checks against an independent reference of the documented rules:

* weight granularity, scope "layer": each layer prunes round(sparsity * numel) weights (Python's
  round, half to even), never its last one and never fewer than it had already lost; the pruned
  weights are the first ones of a *stable* ascending sort of |w| (ties: lower flat index first).
  Scope "global": round(sparsity * total) over all layers, every layer keeping its best weight
  (the last one of its stable sort), ties in (layer order, flat index) order. A second prune()
  only prunes further among the survivors (selection.py, pruner.py);
* N:M: in every M consecutive weights along the input dim (a conv's input channels at one kernel
  position) exactly the M - N lowest (stable) go;
* channel granularity: each hidden layer keeps max(1, floor((1 - s) * width)) channels with scope
  "layer", floor(s * total + 1/2) channels go with scope "global" (each group keeping one)
  (structured/channels.py), and the smaller model computes what the original computes with the
  removed channels zeroed;
* the masked model computes what a plain model with ``where(mask, w, 0)`` computes, tp.sparsity
  counts exactly, and tp.save / tp.load into a fresh instance restores identical masks, weights
  and outputs (bit for bit).

Settings are reproducible for CI: derandomize=True, no example database, no deadline, bounded
examples.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile

import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from torch import nn

import torchprune as tp
from torchprune.importance import resolve
from torchprune.masking import base_type
from torchprune.structured import DependencyGraph
from torchprune.structured.channels import choose_removal
from torchprune.structured.plan import zero_channels

from error_bounds import assert_same_function
from property_settings import SETTINGS, examples

# Masked vs plain and sparse vs masked models are compared in float64, on copies
# (error_bounds.assert_same_function): in float32 and below only summation order (blocking, AVX-512
# vs AVX2) and the rounding of activations between layers would differ, by an amount that follows
# the summed magnitudes, not the outputs.


# ---------------------------------------------------------------------------------------------
# models


@st.composite
def architectures(draw, multiple_of: int = 1, allow_big: bool = False):
    """A plain description of a small model: an MLP or a conv net (conv, optional BN, ReLU,
    ..., flatten, linear). Widths that feed a prunable layer are multiples of ``multiple_of``."""
    kind = draw(st.sampled_from(["mlp", "conv"]))
    width = st.integers(1, 12 // multiple_of if multiple_of > 1 else 12).map(lambda k: k * multiple_of)
    if kind == "mlp":
        widths = [draw(width) for _ in range(draw(st.integers(2, 4)))] + [draw(st.integers(1, 6))]
        big = allow_big and draw(st.booleans())
        return dict(kind="mlp", widths=widths, big=big)
    channels = [draw(width) for _ in range(draw(st.integers(2, 3)))]
    kernels = [draw(st.integers(1, 3)) for _ in channels[1:]]
    return dict(kind="conv", channels=channels, kernels=kernels, bn=draw(st.booleans()),
                size=draw(st.integers(3, 5)), out=draw(st.integers(1, 5)), big=False)


def build(arch, seed: int, dtype=torch.float32, ties: bool = False) -> nn.Module:
    """The model ``arch`` describes, with weights from ``seed``; ``ties`` quantizes every weight
    to a multiple of 1/4 in [-1, 1] (many equal scores, some exact zeros)."""
    torch.manual_seed(seed)
    layers = []
    if arch["kind"] == "mlp":
        widths = list(arch["widths"])
        if arch["big"]:  # > 65,536 weights in one layer: the radix-select path of selection.py
            widths = [272, 256] + widths
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(a, b, bias=bool(i % 2 == 0)))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
    else:
        channels, size = arch["channels"], arch["size"]
        for i, (a, b) in enumerate(zip(channels, channels[1:])):
            k = arch["kernels"][i]
            layers.append(nn.Conv2d(a, b, k, padding=k // 2))
            size = size + 2 * (k // 2) - k + 1
            if arch["bn"]:
                layers.append(nn.BatchNorm2d(b))
            layers.append(nn.ReLU())
        layers += [nn.Flatten(), nn.Linear(channels[-1] * size * size, arch["out"])]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # informative running statistics (eval mode)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            elif ties and isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_((m.weight * 8).round().clamp(-4, 4) / 4)
    return model.to(dtype).eval()


def inputs(arch, batch: int, dtype, seed: int, channels_last: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if arch["kind"] == "mlp":
        shape = (batch, 272 if arch["big"] else arch["widths"][0])
    else:
        shape = (batch, arch["channels"][0], arch["size"], arch["size"])
    x = torch.randn(shape, generator=gen).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def prunable(model: nn.Module):
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def dense_equivalent(model: nn.Module) -> nn.Module:
    """A plain copy of a masked model whose weights are ``where(mask, w, 0)``: the reference."""
    plain = copy.deepcopy(model)
    for m in prunable(plain).values():
        mask = getattr(m, "weight_mask", None)
        if mask is not None:
            m.__class__ = base_type(m)  # back to nn.Linear / nn.Conv2d, whose forward is ATen's
            with torch.no_grad():
                m.weight.copy_(torch.where(mask, m.weight, torch.zeros((), dtype=m.weight.dtype)))
            del m._buffers["weight_mask"]
    return plain


def round_trip(model: nn.Module, fresh: nn.Module) -> nn.Module:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pruned.pt")
        tp.save(model, path)
        return tp.load(path, fresh)


def assert_same_model(loaded: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    """Identical state (masks included, bit for bit) and identical outputs."""
    assert {k: m.tolist() for k, m in tp.masks(loaded).items()} == {k: m.tolist() for k, m in tp.masks(model).items()}
    a, b = loaded.state_dict(), model.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------------------
# the reference rules


def scores_of(model: nn.Module):
    """|w| per prunable layer, flat, float64 (the "magnitude" importance)."""
    return {name: m.weight.detach().abs().double().flatten() for name, m in prunable(model).items()}


def flat_masks(model: nn.Module):
    return {name: (m.weight_mask.flatten().clone() if hasattr(m, "weight_mask")
                   else torch.ones(m.weight.numel(), dtype=torch.bool))
            for name, m in prunable(model).items()}


def prune_lowest(candidates: torch.Tensor, scores: torch.Tensor, count: int) -> torch.Tensor:
    """Flat positions of the ``count`` lowest candidate scores, ties to the lower position."""
    where = candidates.nonzero().flatten()
    order = torch.sort(scores[where], stable=True).indices
    return where[order[:count]]


def expected_layer(scores, kept, sparsity):
    out = {}
    for name, s in scores.items():
        n, k = s.numel(), kept[name]
        already = n - int(k.sum())
        target = min(max(int(round(sparsity * n)), already), max(n - 1, already))
        mask = k.clone()
        mask[prune_lowest(k, s, target - already)] = False
        out[name] = mask
    return out


def expected_global(scores, kept, sparsity):
    names = list(scores)
    total = sum(s.numel() for s in scores.values())
    already = total - sum(int(kept[n].sum()) for n in names)
    candidates = []
    for n in names:  # every layer keeps its best weight: the last of its stable sort
        c = kept[n].clone()
        if c.any():
            where = c.nonzero().flatten()
            best = where[torch.sort(scores[n][where], stable=True).indices[-1]]
            c[best] = False
        candidates.append(c)
    available = sum(int(c.sum()) for c in candidates)
    count = min(max(int(round(sparsity * total)), already) - already, available)
    pruned = prune_lowest(torch.cat(candidates), torch.cat([scores[n] for n in names]), count)
    flat = torch.cat([kept[n] for n in names]).clone()
    flat[pruned] = False
    return dict(zip(names, flat.split([scores[n].numel() for n in names])))


def check_masks(model, expected):
    got = {name: m.flatten() for name, m in tp.masks(model).items()}
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), (
            f"{name}: pruned {int((~got[name]).sum())}, expected {int((~expected[name]).sum())}; "
            f"differ at {(got[name] != expected[name]).nonzero().flatten()[:8].tolist()}")


def check_outputs(model, x, dtype):
    with torch.no_grad():
        assert model(x).dtype == dtype
    assert_same_function(model, dense_equivalent(model), x)


def check_sparsity_count(model):
    zeros = total = 0
    for m in prunable(model).values():
        effective = torch.where(m.weight_mask, m.weight.detach(), torch.zeros((), dtype=m.weight.dtype))
        zeros += int((effective == 0).sum())
        total += m.weight.numel()
    assert tp.sparsity(model) == zeros / total


sparsities = st.one_of(st.just(0.0), st.floats(0.0, 0.99), st.sampled_from([0.5, 0.25, 0.75, 0.9]))


# ---------------------------------------------------------------------------------------------
# weight granularity


@settings(max_examples=examples(30), **SETTINGS)
@given(
    arch=architectures(allow_big=True),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    ties=st.booleans(),
    scope=st.sampled_from(["layer", "global"]),
    first=sparsities,
    second=st.one_of(st.none(), sparsities),
    batch=st.integers(0, 3),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
# always: the radix select (> 65,536 scores) with many ties, with 32- and 64-bit keys
@example(arch=dict(kind="mlp", widths=[4, 6, 3], big=True), dtype=torch.float32, ties=True, scope="global",
         first=0.9, second=0.95, batch=2, channels_last=False, seed=0)
@example(arch=dict(kind="mlp", widths=[8, 5, 2], big=True), dtype=torch.float64, ties=True, scope="layer",
         first=0.5, second=0.8, batch=1, channels_last=False, seed=1)
@example(arch=dict(kind="mlp", widths=[3, 7, 2], big=True), dtype=torch.bfloat16, ties=False, scope="global",
         first=0.3, second=None, batch=1, channels_last=False, seed=2)
def test_prune_weight_exact(arch, dtype, ties, scope, first, second, batch, channels_last, seed):
    event(f"{arch['kind']}{' with a >65,536-weight layer (radix select)' if arch['big'] else ''}, scope {scope}")
    model = build(arch, seed, dtype, ties)
    x = inputs(arch, batch, dtype, seed, channels_last)
    rule = expected_layer if scope == "layer" else expected_global
    expected = rule(scores_of(model), flat_masks(model), first)
    tp.prune(model, sparsity=first, scope=scope)
    check_masks(model, expected)
    if second is not None:  # again: only among the survivors, never fewer than already pruned
        expected = rule(scores_of(model), flat_masks(model), second)
        tp.prune(model, sparsity=second, scope=scope)
        check_masks(model, expected)
    check_sparsity_count(model)
    check_outputs(model, x, dtype)
    fresh = build(arch, seed + 1, dtype)
    assert_same_model(round_trip(model, fresh), model, x)
    if dtype != torch.float16:  # sparsify(): every pruned layer on the sparse kernels (fp32/fp64/bf16)
        sparse = tp.sparsify(model, min_sparsity=0.0)
        swapped = dict(sparse.named_modules())
        for name, mask in tp.masks(model).items():  # layers with nothing pruned stay as they are
            kind = (tp.nn.SparseLinear, tp.nn.SparseConv2d)
            assert isinstance(swapped[name], kind) == (not bool(mask.all())), name
        assert math.isclose(tp.sparsity(sparse), tp.sparsity(model), rel_tol=0, abs_tol=1e-12)
        with torch.no_grad():
            assert sparse(x).dtype == dtype
        assert_same_function(sparse, model, x)


# ---------------------------------------------------------------------------------------------
# N:M granularity


@st.composite
def n_of_m(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    return draw(st.integers(1, m - 1)), m


@settings(max_examples=examples(20), **SETTINGS)
@given(
    nm=n_of_m(),
    arch_seed=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_prune_n_of_m_exact(nm, arch_seed, dtype, ties, seed):
    n, m = nm
    arch = arch_seed.draw(architectures(multiple_of=m))
    model = build(arch, seed, dtype, ties)
    x = inputs(arch, 2, dtype, seed)
    expected = {}
    for name, layer in prunable(model).items():
        w = layer.weight.detach().abs().double()
        grouped = w if w.dim() == 2 else w.movedim(1, -1)  # input channels last
        groups = grouped.reshape(-1, m)
        keep = torch.ones_like(groups, dtype=torch.bool)
        keep.scatter_(1, torch.sort(groups, dim=1, stable=True).indices[:, : m - n], False)
        keep = keep.view(grouped.shape)
        expected[name] = (keep if w.dim() == 2 else keep.movedim(-1, 1)).flatten()
    tp.prune(model, granularity=f"{n}:{m}")
    check_masks(model, expected)
    for name, mask in tp.masks(model).items():
        assert int((~mask).sum()) * m == mask.numel() * (m - n), name  # exactly (M-N)/M per layer
    check_sparsity_count(model)
    check_outputs(model, x, dtype)
    assert_same_model(round_trip(model, build(arch, seed + 1, dtype)), model, x)


# ---------------------------------------------------------------------------------------------
# channel granularity (physical removal)


def hidden_widths(model: nn.Module):
    """Output widths of every prunable layer but the last (the model's output stays)."""
    layers = list(prunable(model).values())
    return [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in layers[:-1]]


@settings(max_examples=examples(20), **SETTINGS)
@given(
    arch=architectures(),
    scope=st.sampled_from(["layer", "global"]),
    sparsity=sparsities,
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_prune_channels_exact_and_equal_to_zeroing(arch, scope, sparsity, ties, seed):
    dtype = torch.float64  # removal vs zeroing: only summation order differs
    model = build(arch, seed, dtype, ties)
    x = inputs(arch, 3, dtype, seed)
    example = (inputs(arch, 2, dtype, seed + 1),)
    before = hidden_widths(model)
    reference = copy.deepcopy(model)
    removed = choose_removal(reference, DependencyGraph(reference, example), sparsity, resolve("magnitude"), scope)
    zero_channels(reference, removed)

    tp.prune(model, sparsity=sparsity, granularity="channel", scope=scope, example_inputs=example)
    after = hidden_widths(model)
    if scope == "layer":
        assert after == [max(1, math.floor((1 - sparsity) * w + 1e-9)) for w in before]
    else:
        total = sum(before)
        assert total - sum(after) == min(math.floor(sparsity * total + 0.5), total - len(before))
        assert all(a >= 1 for a in after)
    assert list(prunable(model).values())[-1].weight.shape[0] == list(prunable(reference).values())[-1].weight.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-10)
    assert_same_model(round_trip(model, build(arch, seed + 1, dtype)), model, x)
