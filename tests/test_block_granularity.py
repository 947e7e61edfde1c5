"""granularity="block:Rx1": tp.prune and tp.Pruner keeping or pruning whole R x 1 blocks (R output
rows by one input column), and the block-sparse layers that store them (tp.nn.SparseLinear in "bsr"
format, picked by from_dense and tp.sparsify).

Selection ranks blocks on the mean of their weights' scores (targets.parse_block, selection.py
block_scores / block_kept / expand_blocks): exact per-layer and global amounts counted in blocks,
thresholds in units of one weight's score, partially pruned blocks counting as pruned, conv blocks
over output channels, row-wise criteria (Wanda) per block row. SparseLinear: format detection,
forward/backward against the masked dense layer, state_dict across formats (a module adopts the
checkpoint's), bad checkpoints refused with nothing changed, whole-model save/load, fine-tuning.
The op-level kernel tests (pack_bsr, block_sparse_linear on its code paths) are in
test_block_sparse_ops.py.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune.masking import attach_mask, effective_weight, get_mask
from torchprune.nn import SparseConv2d, SparseLinear
from torchprune.ops import block_pattern_rows, unpack_bsr
from torchprune.schedules import Cubic
from torchprune.sparsify import plan

from conftest import (
    assert_sparse_unchanged,
    assert_unchanged,
    checkpoint,
    make_mlp,
    snapshot,
    sparse_state,
    through_bytes,
)
from error_bounds import assert_close_bounded, assert_layer_close, assert_same_function, layer_grad_references

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# helpers


def as_blocks(tensor, r):
    """A weight-shaped tensor [out, ...] as [out // r, r, rest]: one row of dim 1 per block."""
    return tensor.reshape(tensor.shape[0] // r, r, -1)


def assert_whole_blocks(mask, r, msg=""):
    """``mask`` is made of whole r x 1 blocks over its first (output) dimension, checked twice: by
    reshaping, and by the library's own detector (on the mask flattened to [out, rest])."""
    blocks = as_blocks(mask, r)
    assert torch.equal(blocks.all(1), blocks.any(1)), f"{msg}: some {r}x1 block is partly kept"
    if not bool(mask.all()):
        assert block_pattern_rows(mask.reshape(mask.shape[0], -1), (r,)) == r, msg


def pruned_blocks(mask, r):
    return int((~as_blocks(mask, r).all(1)).sum())


def block_means(weight, r):
    """Mean |w| of every r x 1 block: [out // r, rest]."""
    return as_blocks(weight.detach().abs().double(), r).mean(1)


def block_mask(out_features, in_features, r, sparsity, seed=0):
    """A random keep-mask [out, in] of whole r x 1 blocks."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(out_features // r, in_features, generator=g) >= sparsity).repeat_interleave(r, 0)


def masked_linear(in_features, out_features, mask, bias=True, dtype=torch.float32, seed=0):
    """A Linear with ``mask`` attached (its pruned weights zero, as prune() leaves them)."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    attach_mask(layer, mask)
    return layer


def four_not_eight(out_features=16, in_features=24, sparsity=0.5, seed=0):
    """A mask of whole 4x1 blocks that is not made of whole 8x1 blocks."""
    mask = block_mask(out_features, in_features, 4, sparsity, seed)
    assert block_pattern_rows(mask, (8,)) is None and block_pattern_rows(mask, (4,)) == 4
    return mask


# ---------------------------------------------------------------------------------------------
# tp.prune: amounts, block shape, which blocks


@pytest.mark.parametrize("granularity,r", [("block", 4), ("block:4x1", 4), ("block:8x1", 8), (" block : 2 x 1 ", 2)])
def test_layer_scope_prunes_exactly_whole_blocks(granularity, r):
    model = make_mlp()
    exclude = ["4"] if r == 8 else []  # the last layer has 4 outputs
    tp.prune(model, sparsity=0.75, granularity=granularity, exclude=exclude)
    masks = tp.masks(model)
    assert set(masks) == ({"0", "2"} if r == 8 else {"0", "2", "4"})
    for name, mask in masks.items():
        assert_whole_blocks(mask, r, name)
        assert int((~mask).sum()) == 0.75 * mask.numel(), name  # 0.75 of the blocks is whole here
        assert pruned_blocks(mask, r) * r == int((~mask).sum())
        if r == 4:  # 4x1 blocks, not some larger whole-block pattern by accident
            assert block_pattern_rows(mask.reshape(mask.shape[0], -1)) == 4
    # pruned weights are zero, kept ones untouched
    original = make_mlp()
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert (weight[~mask] == 0).all()
        assert torch.equal(weight[mask], original.get_submodule(name).weight.detach()[mask])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_one_row_blocks_are_weight_granularity(scope):
    blocks = tp.prune(make_mlp(), sparsity=0.7, scope=scope, granularity="block:1x1")
    weights = tp.prune(make_mlp(), sparsity=0.7, scope=scope)
    for name, mask in tp.masks(weights).items():
        assert torch.equal(tp.masks(blocks)[name], mask), name


def test_the_layer_scope_ranks_blocks_by_their_mean_magnitude():
    """Every pruned block's mean |w| is at most every kept block's, layer by layer."""
    model = tp.prune(make_mlp(), sparsity=0.6, granularity="block:4x1")
    original = make_mlp()
    for name, mask in tp.masks(model).items():
        means = block_means(original.get_submodule(name).weight, 4)
        kept = as_blocks(mask, 4).all(1)
        assert means[~kept].max() <= means[kept].min(), name
        assert pruned_blocks(mask, 4) == round(0.6 * kept.numel()), name


def test_global_scope_hits_the_total_exactly_and_ranks_blocks_across_layers():
    model = tp.prune(make_mlp(), sparsity=0.5, scope="global", granularity="block:4x1")
    masks = tp.masks(model)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == total // 2  # 344 blocks, 172 pruned
    assert tp.sparsity(model) == 0.5
    shares = [float((~m).float().mean()) for m in masks.values()]
    assert len(set(shares)) > 1  # ranked together, not layer by layer
    original = make_mlp()
    kept, pruned = [], []
    for name, mask in masks.items():
        assert_whole_blocks(mask, 4, name)
        means = block_means(original.get_submodule(name).weight, 4)
        keep = as_blocks(mask, 4).all(1)
        kept.append(means[keep].sort().values[:-1])  # each layer's best block is kept whatever it is
        pruned.append(means[~keep])
    assert torch.cat(pruned).max() <= torch.cat(kept).min()


def test_dict_scope_is_exact_per_named_layer_and_only_checks_their_sizes():
    model = make_mlp()
    tp.prune(model, scope={"0": 0.5, "2": 0.875}, granularity="block:8x1")  # layer "4" (4 outputs) not named
    masks = tp.masks(model)
    assert set(masks) == {"0", "2"}
    assert float((~masks["0"]).float().mean()) == 0.5
    assert float((~masks["2"]).float().mean()) == 0.875
    for name, mask in masks.items():
        assert_whole_blocks(mask, 8, name)


def hand_layer():
    """Linear(3, 4): one block row of three 4x1 blocks whose orders differ by pooling:
    mean |w|: C 0.85 < B 0.9 < A 1.0;  max: A < C < B;  min: B < C < A;  L2: C < A < B."""
    layer = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.6],
                                         [-1.0, 0.0, -0.6],
                                         [1.0, 0.0, 0.6],
                                         [-1.0, -3.6, -1.6]]))
    return layer


@pytest.mark.parametrize("sparsity,pruned_columns", [(1 / 3, [2]), (2 / 3, [1, 2])])
def test_the_pruned_blocks_are_those_of_smallest_mean_magnitude(sparsity, pruned_columns):
    layer = tp.prune(hand_layer(), sparsity=sparsity, granularity="block:4x1")
    expected = torch.ones(4, 3, dtype=torch.bool)
    expected[:, pruned_columns] = False
    assert torch.equal(layer.weight_mask, expected)


def test_a_threshold_applies_to_block_means():
    layer = nn.Linear(4, 8, bias=False)
    with torch.no_grad():  # block (0, j): rows 0-3 of column j, mean |w| 5, 4.5, 4, 4; block row 1: >= 12
        layer.weight.copy_(torch.arange(32.0).reshape(8, 4) - 10)
    per_weight = tp.prune(copy.deepcopy(layer), threshold=4.5)
    tp.prune(layer, threshold=4.5, granularity="block:4x1")
    expected = torch.ones(8, 4, dtype=torch.bool)
    expected[:4, 2:] = False  # 4 < 4.5 pruned; 4.5 is not below 4.5: kept
    assert torch.equal(layer.weight_mask, expected)
    assert not torch.equal(per_weight.weight_mask, expected)  # weights below 4.5 sit in kept blocks
    # a threshold may empty a layer, in whole blocks too
    assert not tp.prune(layer, threshold=100.0, granularity="block:4x1").weight_mask.any()


def test_a_second_prune_keeps_the_blocks_pruned_before():
    model = tp.prune(make_mlp(), sparsity=0.5, granularity="block:4x1")
    first = {k: v.clone() for k, v in tp.masks(model).items()}
    torch.manual_seed(3)  # random scores rate the pruned blocks as high as any: they must stay out anyway
    tp.prune(model, sparsity=0.75, granularity="block:4x1", importance="random")
    for name, mask in tp.masks(model).items():
        assert_whole_blocks(mask, 4, name)
        assert not (mask & ~first[name]).any(), name
        assert int((~mask).sum()) == 0.75 * mask.numel(), name
    # a lower sparsity than already pruned changes nothing
    again = {k: v.clone() for k, v in tp.masks(model).items()}
    tp.prune(model, sparsity=0.25, granularity="block:4x1")
    for name, mask in tp.masks(model).items():
        assert torch.equal(mask, again[name]), name


def test_partly_pruned_blocks_of_an_unstructured_mask_count_as_pruned():
    layer = nn.Linear(4, 8, bias=False)
    base = torch.tensor([[9.0, 2.0, 3.0, 5.0],  # block means of block row 0
                         [1.0, 6.0, 4.0, 8.0]])  # and of block row 1
    with torch.no_grad():
        layer.weight.copy_(base.repeat_interleave(4, 0) * torch.tensor([1.0, -1.1, 0.9, -1.0]).repeat(2)[:, None])
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[2, 0] = False  # one weight of the strongest block (0, 0)
    mask[7, 3] = False  # one weight of block (1, 3)
    attach_mask(layer, mask)
    tp.prune(layer, sparsity=0.5, granularity="block:4x1")  # 4 of 8 blocks: the 2 partial ones + 2 weakest
    expected_blocks = torch.tensor([[False, False, True, True],
                                    [False, True, True, False]])
    assert torch.equal(layer.weight_mask, expected_blocks.repeat_interleave(4, 0))
    assert (layer.weight[~layer.weight_mask] == 0).all()
    # more pruned already than asked for: the partial blocks go, nothing else
    layer = nn.Linear(4, 8, bias=False)
    attach_mask(layer, mask)
    tp.prune(layer, sparsity=0.125, granularity="block:4x1")
    assert pruned_blocks(layer.weight_mask, 4) == 2 and int((~layer.weight_mask).sum()) == 8


def test_conv_blocks_run_over_output_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    weight = conv.weight.detach().clone()
    tp.prune(conv, sparsity=0.5, granularity="block:4x1")
    mask = conv.weight_mask
    assert mask.shape == (8, 3, 3, 3)
    blocks = mask.reshape(2, 4, 3, 3, 3)  # output channels 0-3 and 4-7, at each (input, kh, kw)
    assert torch.equal(blocks.all(1), blocks.any(1))
    assert_whole_blocks(mask, 4)
    # the 27 blocks of smallest mean |w| over their 4 output channels, of 54
    means = weight.abs().double().reshape(2, 4, 27).mean(1).flatten()
    expected = torch.ones(54, dtype=torch.bool)
    expected[means.argsort()[:27]] = False
    assert torch.equal(blocks.all(1).flatten(), expected)
    # Conv1d too
    conv1d = tp.prune(nn.Conv1d(4, 8, 3), sparsity=0.75, granularity="block:8x1")
    assert_whole_blocks(conv1d.weight_mask, 8)
    assert int((~conv1d.weight_mask).sum()) == 0.75 * conv1d.weight_mask.numel()


def test_wanda_with_data_prunes_each_block_row_by_block_means_of_its_scores():
    model = make_mlp()
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(8, 16, generator=g) * torch.linspace(0.1, 3.0, 16) for _ in range(3)]
    weight0 = model[0].weight.detach().clone()
    tp.prune(model, sparsity=0.5, importance="wanda", data=data, granularity="block:4x1")
    masks = tp.masks(model)
    for name, mask in masks.items():
        assert_whole_blocks(mask, 4, name)
        kept = as_blocks(mask, 4).all(1)
        assert (kept.sum(1) == kept.shape[1] // 2).all(), name  # row-wise: half of every block row
    # layer 0 reads the data directly: |W_ij| * ||X_j||_2, averaged over each block
    norms = torch.cat(data).double().square().sum(0).sqrt()
    scores = block_means(weight0, 4) * norms  # [8 block rows, 16]
    expected = torch.ones_like(scores, dtype=torch.bool)
    expected.scatter_(1, scores.argsort(1)[:, :8], False)
    assert torch.equal(as_blocks(masks["0"], 4).all(1), expected)
    # ... which is not what magnitude alone gives
    magnitude = tp.prune(make_mlp(), sparsity=0.5, granularity="block:4x1")
    assert not torch.equal(tp.masks(magnitude)["0"], masks["0"])


def test_owl_allocates_in_whole_blocks():
    data = [torch.randn(8, 16) for _ in range(2)]
    model = tp.prune(make_mlp(), sparsity=0.5, scope="owl", importance="wanda", data=data,
                     granularity="block:4x1")
    for name, mask in tp.masks(model).items():
        assert_whole_blocks(mask, 4, name)
    assert abs(tp.sparsity(model) - 0.5) < 0.1


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("entry", ["prune", "Pruner"])
def test_a_layer_without_outputs_gets_an_empty_mask(entry):
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 0))
    if entry == "prune":
        tp.prune(model, sparsity=0.5, granularity="block:4x1")
    else:
        pruner = tp.Pruner(model, 0.5, Cubic(0, 2), granularity="block:4x1")
        for _ in range(3):
            pruner.step()
    assert tp.masks(model)["1"].shape == (0, 8)
    assert_whole_blocks(tp.masks(model)["0"], 4)
    assert int((~tp.masks(model)["0"]).sum()) == 16


# ---------------------------------------------------------------------------------------------
# tp.prune / tp.Pruner: refusals, with nothing changed


@pytest.mark.parametrize("granularity,message", [
    ("block:4x2", "Rx1"),
    ("block:0x1", "R >= 1"),
    ("block:4X1", "block:Rx1"),
    ("blocks", "block:Rx1"),
    ("block:x1", "block:Rx1"),
    ("block:-4x1", "block:Rx1"),
    ("block:4", "block:Rx1"),
])
def test_bad_block_strings_are_refused_and_nothing_changes(granularity, message):
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        tp.prune(model, sparsity=0.5, granularity=granularity)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=message):
        tp.Pruner(model, 0.5, Cubic(0, 10), granularity=granularity)
    assert_unchanged(model, before)


@pytest.mark.parametrize("granularity,layer,outputs", [("block:3x1", "0", 32), ("block:8x1", "4", 4),
                                                       ("block:16x1", "2", 24)])
def test_a_block_height_that_does_not_divide_a_layer_names_it(granularity, layer, outputs):
    model = make_mlp()
    tp.prune(model, sparsity=0.3)  # already pruned: the masks must stay as they are too
    before = snapshot(model)
    message = rf"{granularity}.*layer '{layer}' \(Linear\) has {outputs} outputs"
    with pytest.raises(ValueError, match=message):
        tp.prune(model, sparsity=0.5, granularity=granularity)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=message):
        tp.prune(model, sparsity=0.5, scope="global", granularity=granularity)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=message):
        tp.Pruner(model, 0.5, Cubic(0, 10), granularity=granularity)
    assert_unchanged(model, before)


def test_sparsegpt_is_refused_with_blocks_and_nothing_changes():
    model = make_mlp()
    data = [torch.randn(8, 16) for _ in range(2)]
    before = snapshot(model)
    for scope in ("layer", "global"):
        with pytest.raises(ValueError, match="reconstructs weight by weight"):
            tp.prune(model, sparsity=0.5, scope=scope, importance="sparsegpt", data=data, granularity="block:4x1")
        assert_unchanged(model, before)
    with pytest.raises(ValueError, match="reconstructs weight by weight"):
        tp.Pruner(model, 0.5, Cubic(0, 10), importance="sparsegpt", data=data, granularity="block")
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# tp.Pruner


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def train(model, optimizer, pruner, data, check=None):
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()
        if check is not None:
            check()


SCHEDULE = Cubic(begin=1, end=16, every=3)  # updates at 1, 4, 7, 10, 13, 16
PRUNER_CASES = {
    "magnitude": dict(target_sparsity=0.75),
    "global": dict(target_sparsity=0.75, scope="global"),
    "wanda": dict(target_sparsity=0.5, importance="wanda"),
    "taylor-8x1": dict(target_sparsity=0.75, importance="taylor", granularity="block:8x1", exclude=["4"]),
    "dict": dict(target_sparsity=None, scope={"0": 0.75, "2": 0.5, "4": 0.25}),
}


def make_run(case, seed=0):
    model = make_mlp(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    kwargs = {"granularity": "block:4x1", **PRUNER_CASES[case]}
    return model, optimizer, tp.Pruner(model, schedule=SCHEDULE, **kwargs)


@pytest.mark.parametrize("case", ["magnitude", "global", "taylor-8x1", "dict"])
def test_pruner_follows_the_cubic_schedule_in_whole_blocks(case):
    model, optimizer, pruner = make_run(case)
    r = 8 if case == "taylor-8x1" else 4
    previous = {}
    seen = []

    def check():
        masks = tp.masks(model)
        targets = pruner.target_at()
        for name, mask in masks.items():
            assert_whole_blocks(mask, r, f"{name} at step {pruner.steps}")
            if name in previous:
                assert not (mask & ~previous[name]).any(), "masks only grow"
            previous[name] = mask.clone()
            blocks = mask.shape[0] // r * mask[0].numel()
            if case != "global":
                assert abs(pruned_blocks(mask, r) - targets[name] * blocks) <= 0.5, (name, pruner.steps)
        if case == "global":
            total = sum(m.numel() for m in masks.values()) // r
            target = next(iter(targets.values()))
            assert abs(sum(pruned_blocks(m, r) for m in masks.values()) - target * total) <= 0.5
        seen.append(pruner.sparsity)

    train(model, optimizer, pruner, batches(18), check)
    assert sorted(seen) == seen and len(set(seen)) >= 5  # grew at every update
    masks = {k: v.clone() for k, v in tp.masks(model).items()}
    final = PRUNER_CASES[case]["scope"] if case == "dict" else dict.fromkeys(masks, 0.75)
    if case == "global":
        assert pruner.sparsity == 0.75
    else:  # exact: every final amount is a whole number of blocks here
        assert {k: float((~m).float().mean()) for k, m in masks.items()} == final
    pruner.finalize()
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert get_mask(model.get_submodule(name)) is None
        assert torch.equal(weight != 0, mask), name  # finalized zeros are the whole blocks


def test_pruner_with_wanda_observing_training_forwards_keeps_block_rows_even():
    model, optimizer, pruner = make_run("wanda")
    train(model, optimizer, pruner, batches(18))
    for name, mask in tp.masks(model).items():
        assert_whole_blocks(mask, 4, name)
        kept = as_blocks(mask, 4).all(1)
        assert (kept.sum(1) == kept.shape[1] // 2).all(), name


@pytest.mark.parametrize("case", list(PRUNER_CASES))
def test_pruner_resumed_between_updates_ends_like_the_uninterrupted_run(case):
    data = batches(18)
    straight, straight_optimizer, straight_pruner = make_run(case)
    train(straight, straight_optimizer, straight_pruner, data)

    model, optimizer, pruner = make_run(case)
    stops = (6, 12)
    train(model, optimizer, pruner, data[:stops[0]])
    for start, stop in zip(stops, stops[1:] + (len(data),)):
        state = checkpoint(model, optimizer, pruner)
        model, optimizer, pruner = make_run(case, seed=start)  # other initial weights: all comes from `state`
        pruner.load_state_dict(state["pruner"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        assert pruner.steps == start
        train(model, optimizer, pruner, data[start:stop])

    a, b = straight.state_dict(), model.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert pruner.sparsity == straight_pruner.sparsity > 0
    r = 8 if case == "taylor-8x1" else 4
    for name, mask in tp.masks(model).items():
        assert_whole_blocks(mask, r, name)


# ---------------------------------------------------------------------------------------------
# SparseLinear: format, forward, backward, accessors


@pytest.mark.parametrize("kind,expected", [
    ("8x1", "bsr 8x1"),
    ("4x1", "bsr 4x1"),
    ("unstructured", "csr"),
    ("unmasked 4x1 zeros", "bsr 4x1"),
    ("unmasked dense", "csr"),
    ("all kept", "csr"),
])
def test_from_dense_picks_the_format(kind, expected):
    if kind == "8x1":
        mask = block_mask(16, 24, 8, 0.5)
    elif kind in ("4x1", "unmasked 4x1 zeros"):
        mask = four_not_eight()
    elif kind == "unstructured":
        mask = torch.rand(16, 24, generator=torch.Generator().manual_seed(0)) >= 0.5
    else:
        mask = torch.ones(16, 24, dtype=torch.bool)
    if kind.startswith("unmasked"):
        torch.manual_seed(0)
        dense = nn.Linear(24, 16)
        with torch.no_grad():
            dense.weight.mul_(mask)
    else:
        dense = masked_linear(24, 16, mask)
    sparse = SparseLinear.from_dense(dense)
    assert sparse.format == f"{expected} (int16 col_idx)"
    r = int(expected.split()[1][0]) if expected.startswith("bsr") else 1
    assert sparse.block_rows == r
    assert sparse.values.shape == ((int(mask.sum()),) if r == 1 else (int(mask.sum()) // r, r))
    assert sparse.row_ptr.numel() == 16 // r + 1
    assert torch.equal(sparse.dense_weight(), effective_weight(dense))


def test_from_dense_block_rows_forces_the_format():
    mask8 = block_mask(16, 24, 8, 0.5)
    layer = masked_linear(24, 16, mask8)
    assert SparseLinear.from_dense(layer, block_rows=1).format.startswith("csr ")
    four = SparseLinear.from_dense(layer, block_rows=4)  # 8x1 blocks are whole 4x1 blocks too
    assert four.format.startswith("bsr 4x1 ") and four.values.shape == (int(mask8.sum()) // 4, 4)
    assert torch.equal(four.dense_weight(), effective_weight(layer))
    with pytest.raises(ValueError, match="whole 8x1 blocks"):
        SparseLinear.from_dense(masked_linear(24, 16, four_not_eight()), block_rows=8)
    with pytest.raises(ValueError, match="block_rows"):
        SparseLinear.from_dense(layer, block_rows=3)
    # unmasked: every block holding a nonzero is stored, zeros among them included
    torch.manual_seed(0)
    plain = nn.Linear(24, 16)
    with torch.no_grad():
        plain.weight.mul_(four_not_eight())
        plain.weight[0, plain.weight[0].nonzero()[0]] = 0.0  # one zero inside a kept block
    stored = SparseLinear.from_dense(plain, block_rows=4)
    assert stored.nnz == int(four_not_eight().sum())
    assert torch.equal(stored.dense_weight(), plain.weight.detach())


@pytest.mark.parametrize("block_rows", [3, 0, -4, True, 2.0])
def test_a_bad_block_rows_is_refused_naming_it(block_rows):
    with pytest.raises(ValueError, match="block_rows"):
        SparseLinear(16, 8, block_rows=block_rows)


def test_a_fresh_block_module_is_empty_and_computes_its_bias():
    layer = SparseLinear(16, 8, block_rows=4)
    assert layer.format == "bsr 4x1 (int16 col_idx)" and layer.block_rows == 4
    assert layer.nnz == 0 and layer.sparsity == 1.0
    assert layer.values.shape == (0, 4) and layer.row_ptr.shape == (3,)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(8.0))
    assert torch.equal(layer(torch.randn(5, 16)), torch.arange(8.0).expand(5, 8))
    assert torch.equal(layer.dense_weight(), torch.zeros(8, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_the_masked_layer(dtype, r, bias):
    mask = block_mask(32, 40, r, 0.6, seed=r)
    dense = masked_linear(40, 32, mask, bias=bias, dtype=dtype)
    with torch.no_grad():  # garbage in the pruned slots: the mask, not the zeros, decides
        dense.weight[~mask] = 7.0
    sparse = SparseLinear.from_dense(dense)
    assert sparse.block_rows == r and sparse.values.dtype == dtype
    g = torch.Generator().manual_seed(1)
    for shape in [(40,), (1, 40), (5, 40), (3, 7, 40), (33, 40)]:
        x = torch.randn(shape, generator=g).to(dtype)
        out = sparse(x)
        assert out.shape == (*shape[:-1], 32) and out.dtype == dtype
        assert_layer_close(out, dense, x, f"{dtype} R={r} x {list(shape)}")  # the rounding bound of dtype
    if dtype == torch.float64:  # float64: tight
        x = torch.randn(6, 40, dtype=dtype, generator=g)
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-12, atol=1e-12)
    if dtype == torch.bfloat16:  # loose, against the masked layer itself
        x = torch.randn(6, 40, generator=g).to(dtype)
        torch.testing.assert_close(sparse(x).float(), dense(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_the_masked_dense_layer_on_kept_weights(dtype):
    mask = block_mask(16, 24, 4, 0.5, seed=2)
    dense = masked_linear(24, 16, mask, dtype=dtype)
    sparse = SparseLinear.from_dense(dense)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 24, generator=g, dtype=dtype)
    grad_out = torch.randn(5, 16, generator=g, dtype=dtype)

    leaf = x.clone().requires_grad_()
    sparse(leaf).backward(grad_out)
    assert sparse.values.grad.shape == sparse.values.shape == (int(mask.sum()) // 4, 4)
    weight_grad = unpack_bsr(sparse.row_ptr, sparse.col_idx, sparse.values.grad, 24)

    dense_leaf = x.clone().requires_grad_()
    dense(dense_leaf).backward(grad_out)
    if dtype == torch.float64:
        tight = dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(leaf.grad, dense_leaf.grad, **tight)
        torch.testing.assert_close(weight_grad[mask], dense.weight.grad[mask], **tight)
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, **tight)
    else:  # against float64 references, within the float32 rounding bound of each sum
        (_, gx, gw), (_, mx, mw), (_, tx, tw) = layer_grad_references(dense, x, grad_out)
        assert_close_bounded(leaf.grad, gx, mx, tx, dtype, "grad x")
        assert_close_bounded(weight_grad[mask], gw[mask], mw[mask], tw[mask], dtype, "grad values")
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)
    assert (weight_grad[~mask] == 0).all()


def test_nnz_sparsity_format_dense_weight_and_to_dense():
    mask = block_mask(16, 300, 8, 0.75, seed=4)
    dense = masked_linear(300, 16, mask)
    sparse = SparseLinear.from_dense(dense)
    assert sparse.nnz == int(mask.sum()) == sparse.values.numel()
    assert sparse.sparsity == pytest.approx(1 - int(mask.sum()) / mask.numel(), abs=1e-12)
    assert sparse.format == "bsr 8x1 (int16 col_idx)"
    assert sparse.dense_shape == (16, 300)
    assert "format=bsr 8x1 (int16 col_idx)" in repr(sparse) and f"nnz={sparse.nnz}" in repr(sparse)
    assert torch.equal(sparse.dense_weight(), effective_weight(dense))
    back = sparse.to_dense()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, effective_weight(dense)) and torch.equal(back.bias, dense.bias)
    assert tp.sparsity(sparse) == pytest.approx(sparse.sparsity, abs=1e-12)
    wide = SparseLinear.from_dense(masked_linear(70000, 8, block_mask(8, 70000, 4, 0.99, seed=5)))
    assert wide.format == "bsr 4x1 (int32 col_idx)"
    x = torch.randn(2, 70000)
    assert_layer_close(wide(x), wide.to_dense(), x)


# ---------------------------------------------------------------------------------------------
# SparseLinear: state_dict across formats, saving, bad checkpoints


def test_block_state_dict_round_trip_and_a_csr_module_adopts_blocks():
    mask = block_mask(16, 24, 4, 0.5, seed=6)
    source = SparseLinear.from_dense(masked_linear(24, 16, mask))
    state = through_bytes(source.state_dict())
    assert set(state) == {"values", "row_ptr", "col_idx", "bias", "_extra_state"}
    assert state["_extra_state"] == {"format": "bsr", "shape": [16, 24], "block": [4, 1]}
    assert state["values"].shape == (int(mask.sum()) // 4, 4) and state["row_ptr"].shape == (5,)

    target = SparseLinear.from_dense(masked_linear(24, 16, torch.rand(16, 24) > 0.3, seed=1))  # CSR, other nnz
    values = target.values
    assert target.block_rows == 1
    target.load_state_dict(state)
    assert target.values is values  # the same Parameter (optimizers keep their reference)
    assert target.block_rows == 4 and target.format == "bsr 4x1 (int16 col_idx)"
    assert target.nnz == source.nnz and target.get_extra_state() == state["_extra_state"]
    assert torch.equal(target.dense_weight(), source.dense_weight())
    x = torch.randn(3, 24)
    assert torch.equal(target(x), source(x))
    # an empty fresh module too, and it saves what it loaded
    fresh = SparseLinear(24, 16)
    fresh.load_state_dict(state)
    assert fresh.format == "bsr 4x1 (int16 col_idx)" and torch.equal(fresh(x), source(x))
    again = fresh.state_dict()
    for key in ("values", "row_ptr", "col_idx", "bias"):
        assert torch.equal(again[key], state[key]), key
    assert again["_extra_state"] == state["_extra_state"]


def test_a_block_module_adopts_a_csr_checkpoint():
    source = SparseLinear.from_dense(masked_linear(24, 16, torch.rand(16, 24) > 0.6, seed=2))
    state = through_bytes(source.state_dict())
    assert state["_extra_state"] == {"format": "csr", "shape": [16, 24]}
    target = SparseLinear.from_dense(masked_linear(24, 16, block_mask(16, 24, 8, 0.5)))
    assert target.block_rows == 8
    target.load_state_dict(state)
    assert target.block_rows == 1 and target.format == "csr (int16 col_idx)"
    assert target.values.shape == (source.nnz,) and target.row_ptr.shape == (17,)
    x = torch.randn(3, 24)
    assert torch.equal(target(x), source(x))
    assert target.state_dict()["_extra_state"] == {"format": "csr", "shape": [16, 24]}
    # and back to blocks, of another height
    blocks = SparseLinear.from_dense(masked_linear(24, 16, four_not_eight(), seed=3))
    target.load_state_dict(blocks.state_dict())
    assert target.block_rows == 4 and torch.equal(target(x), blocks(x))


def test_a_checkpoint_without_extra_state_takes_the_block_height_from_the_values():
    source = SparseLinear.from_dense(masked_linear(24, 16, block_mask(16, 24, 8, 0.5)))
    state = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    target = SparseLinear(24, 16)
    target.load_state_dict(state, strict=False)
    assert target.block_rows == 8
    x = torch.randn(2, 24)
    assert torch.equal(target(x), source(x))


def test_whole_sparsified_model_through_torch_save_deepcopy_and_tp_save(tmp_path):
    model = tp.prune(make_mlp(), sparsity=0.75, granularity="block:4x1")
    sparse = tp.sparsify(model, min_sparsity=0.0)
    x = torch.randn(5, 16)
    expected = sparse(x)
    path = os.path.join(tmp_path, "whole.pt")
    torch.save(sparse, path)
    loaded = torch.load(path, weights_only=False)
    copied = copy.deepcopy(sparse)
    for other in (loaded, copied):
        for i in (0, 2, 4):
            assert other[i].format == "bsr 4x1 (int16 col_idx)"
        assert torch.equal(other(x), expected)
    # its state_dict into a CSR-sparsified model of other weights and sparsity
    csr = tp.sparsify(tp.prune(make_mlp(seed=1), sparsity=0.5), min_sparsity=0.0)
    assert csr[0].format.startswith("csr")
    csr.load_state_dict(through_bytes(sparse.state_dict()))
    assert all(csr[i].block_rows == 4 for i in (0, 2, 4))
    assert torch.equal(csr(x), expected)
    # tp.save / tp.load into a model sparsified the same way (other weights)
    file = os.path.join(tmp_path, "tp.pt")
    tp.save(sparse, file)
    target = tp.sparsify(tp.prune(make_mlp(seed=2), sparsity=0.75, granularity="block:4x1"), min_sparsity=0.0)
    assert not torch.equal(target(x), expected)
    assert tp.load(file, target) is target
    assert all(target[i].format == "bsr 4x1 (int16 col_idx)" for i in (0, 2, 4))
    assert torch.equal(target(x), expected)


def block_source():
    return SparseLinear.from_dense(masked_linear(24, 16, block_mask(16, 24, 4, 0.5, seed=7)))


def with_extra(**extra):
    return lambda s: dict(s, _extra_state={"format": "bsr", "shape": [16, 24], **extra})


@pytest.mark.parametrize("change,message", [
    (lambda s: dict(s, values=torch.randn(s["values"].shape[0], 8)), r"'values' must be \[blocks, 4\]"),
    (lambda s: dict(s, values=torch.randn(s["values"].shape[0], 2)), r"'values' must be \[blocks, 4\]"),
    (lambda s: dict(s, values=s["values"].flatten()), "'values' must be a 2-D tensor"),
    (with_extra(block=[3, 1]), "R dividing out_features = 16"),
    (with_extra(block=[32, 1]), "R dividing out_features = 16"),
    (with_extra(block=[4, 2]), r"'block': \[R, 1\]"),
    (with_extra(block=[0, 1]), r"'block': \[R, 1\]"),
    (with_extra(block=[True, 1]), r"'block': \[R, 1\]"),
    (with_extra(block=[4.0, 1]), r"'block': \[R, 1\]"),
    (with_extra(block="4x1"), r"'block': \[R, 1\]"),
    (with_extra(block=[4]), r"'block': \[R, 1\]"),
    (with_extra(), r"'block': \[R, 1\]"),
    (lambda s: dict(s, _extra_state={"format": "csr", "shape": [16, 24], "block": [4, 1]}), "'format': 'csr'"),
    (lambda s: dict(s, _extra_state={"format": "bsc", "shape": [16, 24], "block": [4, 1]}), "'format': 'bsr'"),
    (with_extra(block=[4, 1], shape=[16, 25]), "dense shape"),
    (lambda s: dict(s, row_ptr=torch.zeros(17, dtype=torch.int32)), r"'row_ptr' must be int32 with 5 entries"),
    (lambda s: dict(s, row_ptr=s["row_ptr"].flip(0)), "must start at 0"),
    (lambda s: dict(s, col_idx=s["col_idx"].flip(0)), "must ascend"),
    (lambda s: dict(s, col_idx=torch.full_like(s["col_idx"], 30)), "column 30"),
], ids=["values dim1 8", "values dim1 2", "values 1-D", "R 3", "R 32", "block 4x2", "block 0", "block bool",
        "block float", "block str", "block short", "block missing", "csr with block", "format bsc", "shape",
        "row_ptr length", "row_ptr order", "col order", "col range"])
@pytest.mark.parametrize("target_kind", ["csr", "bsr 8x1"])
def test_bad_block_checkpoints_are_refused_clearly_and_change_nothing(change, message, target_kind):
    state = block_source().state_dict()
    if target_kind == "csr":
        target = SparseLinear.from_dense(masked_linear(24, 16, torch.rand(16, 24) > 0.7, seed=8))
    else:
        target = SparseLinear.from_dense(masked_linear(24, 16, block_mask(16, 24, 8, 0.3, seed=8)))
    before = sparse_state(target)
    x = torch.randn(3, 24)
    out = target(x)
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(change(state))
    assert_sparse_unchanged(target, before)
    assert torch.equal(target(x), out)


def test_a_conv_refuses_block_checkpoints_and_stays_csr():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3)
    attach_mask(conv, torch.rand(conv.weight.shape) > 0.5)
    sparse = SparseConv2d.from_dense(conv)
    assert sparse.format.startswith("csr") and sparse.block_rows == 1
    state = sparse.state_dict()
    before = sparse_state(sparse)
    bsr = dict(state, _extra_state={"format": "bsr", "shape": [8, 4, 3, 3], "block": [4, 1]},
               values=torch.randn(2, 4), col_idx=state["col_idx"][:2],
               row_ptr=torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"'_extra_state' must be a \{'format': 'csr'"):
        sparse.load_state_dict(bsr)
    assert_sparse_unchanged(sparse, before)
    no_extra = {k: v for k, v in bsr.items() if k != "_extra_state"}
    with pytest.raises(RuntimeError, match="holds CSR only"):
        sparse.load_state_dict(no_extra, strict=False)
    assert_sparse_unchanged(sparse, before)
    # a conv pruned in blocks is still stored as CSR (the block kernel is the Linear's)
    tp.prune(conv, sparsity=0.5, granularity="block:4x1")
    assert SparseConv2d.from_dense(conv).format.startswith("csr")


def test_a_block_checkpoint_of_another_layer_shape_is_refused():
    state = block_source().state_dict()
    target = SparseLinear(24, 32)
    before = sparse_state(target)
    with pytest.raises(RuntimeError, match="dense shape"):
        target.load_state_dict(state)
    assert_sparse_unchanged(target, before)


# ---------------------------------------------------------------------------------------------
# tp.sparsify


@pytest.mark.parametrize("r", [4, 8])
def test_sparsify_swaps_in_block_layers_with_the_same_outputs(r):
    model = tp.prune(make_mlp(), sparsity=0.75, granularity=f"block:{r}x1", exclude=["4"] if r == 8 else [])
    before = snapshot(model)
    sparse = tp.sparsify(model, min_sparsity=0.5)
    assert_unchanged(model, before)
    for i in (0, 2):
        assert isinstance(sparse[i], SparseLinear) and sparse[i].block_rows == r, i
        assert sparse[i].format == f"bsr {r}x1 (int16 col_idx)"
    if r == 4:
        assert isinstance(sparse[4], SparseLinear) and sparse[4].block_rows == 4
    else:
        assert type(sparse[4]) is nn.Linear  # excluded: not pruned, stays
    assert tp.sparsity(sparse) == pytest.approx(tp.sparsity(model), abs=1e-12)
    x = torch.randn(7, 16)
    assert_same_function(model, sparse, x)
    assert_layer_close(sparse[0](x), model[0], x)  # in float32, within the rounding bound


def test_sparsify_timed_on_example_inputs_still_computes_the_same():
    model = tp.prune(make_mlp(), sparsity=0.9375, granularity="block:4x1")
    sparse = tp.sparsify(model, example_inputs=torch.randn(1, 16))
    swapped = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert all(m.block_rows == 4 for m in swapped)
    decisions = plan(model, example_inputs=torch.randn(1, 16))
    assert all(d.reason.startswith("timed") for d in decisions.values())
    assert_same_function(model, sparse, torch.randn(5, 16))


def test_sparsify_by_the_cost_model_handles_block_layers():
    model = tp.prune(make_mlp(), sparsity=0.9375, granularity="block:4x1")
    decisions = plan(model)  # neither min_sparsity nor example_inputs
    assert set(decisions) == {"0", "2", "4"}
    assert all(d.reason.startswith("cost model") for d in decisions.values())
    sparse = tp.sparsify(model)
    for name, decision in decisions.items():
        layer = sparse.get_submodule(name)
        assert isinstance(layer, SparseLinear) == decision.swap, name
        assert not decision.swap or layer.block_rows == 4, name
    assert_same_function(model, sparse, torch.randn(5, 16))


def test_sparsify_keeps_csr_for_unstructured_masks():
    model = tp.prune(make_mlp(), sparsity=0.75)
    sparse = tp.sparsify(model, min_sparsity=0.0)
    for i in (0, 2, 4):
        assert sparse[i].block_rows == 1 and sparse[i].format.startswith("csr"), i
    assert_same_function(model, sparse, torch.randn(4, 16))
    # a mix: one layer in blocks, the others unstructured
    mixed = tp.prune(make_mlp(), scope={"2": 0.75}, granularity="block:8x1")
    tp.prune(mixed, scope={"0": 0.75, "4": 0.75})
    sparse = tp.sparsify(mixed, min_sparsity=0.0)
    assert [sparse[i].block_rows for i in (0, 2, 4)] == [1, 8, 1]
    assert_same_function(mixed, sparse, torch.randn(4, 16))
    # a conv pruned in blocks: SparseConv2d, CSR (the block kernel is the Linear's)
    torch.manual_seed(0)
    convs = tp.prune(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 8)),
                     sparsity=0.75, granularity="block:4x1")
    sparse = tp.sparsify(convs, min_sparsity=0.0)
    assert isinstance(sparse[0], SparseConv2d) and sparse[0].format.startswith("csr")
    assert sparse[3].format.startswith("bsr ")
    assert_same_function(convs, sparse, torch.randn(2, 3, 5, 5))


def test_the_summary_does_not_call_a_block_layer_csr():
    sparse = tp.sparsify(tp.prune(make_mlp(), sparsity=0.75, granularity="block:4x1"), min_sparsity=0.0)
    rows = tp.summary(sparse).rows
    assert [row["sparsity"] for row in rows if row["name"] in ("0", "2", "4")] == [0.75] * 3
    assert not any("CSR" in row["note"] for row in rows if row["name"] in ("0", "2", "4"))


# ---------------------------------------------------------------------------------------------
# fine-tuning through a block layer


def test_fine_tuning_moves_only_the_stored_block_values():
    mask = block_mask(16, 24, 4, 0.6, seed=9)
    dense = masked_linear(24, 16, mask)
    sparse = SparseLinear.from_dense(dense)
    row_ptr, col_idx = sparse.row_ptr.clone(), sparse.col_idx.clone()
    start = sparse.dense_weight().clone()
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(10)
    x, target = torch.randn(32, 24, generator=g), torch.randn(32, 16, generator=g)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = F.mse_loss(sparse(x), target)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    assert torch.equal(sparse.row_ptr, row_ptr) and torch.equal(sparse.col_idx, col_idx)
    assert sparse.block_rows == 4 and sparse.values.shape == (int(mask.sum()) // 4, 4)
    weight = sparse.dense_weight()
    assert (weight[~mask] == 0).all()
    assert (weight[mask] != start[mask]).all()  # every stored value moved
    rebuilt = nn.Linear(24, 16)
    with torch.no_grad():
        rebuilt.weight.copy_(weight)
        rebuilt.bias.copy_(sparse.bias)
    assert_layer_close(sparse(x), rebuilt, x)
    assert_same_function(rebuilt, sparse, x)
    assert torch.equal(sparse.to_dense().weight, weight)
