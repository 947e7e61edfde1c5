"""SparseGPT (torchprune/importance/sparsegpt.py) against a plain float64 reference written here.

The reference (`ref_sparsegpt`) follows the equations with explicit loops and shares no code with
the implementation: it inverts the damped H with `linalg.inv` (not Cholesky inverse), ranks with
Python's sort, and applies each column's update to every later column at once (no lazy block
update, which is the same sum in another order). On float64 layers the masks must match exactly and
the weights to rounding.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune import selection
from torchprune.importance import sparsegpt as sg
from torchprune.masking import attach_mask

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# the reference


def ref_factor(h, damp):
    """(U, dead) for one group: U the upper Cholesky factor of the damped H^-1."""
    h = h.clone()
    d = h.shape[0]
    dead = [bool(h[j, j] == 0) for j in range(d)]
    for j in range(d):
        if dead[j]:
            h[j, j] = 1.0
    mean = sum(float(h[j, j]) for j in range(d)) / d
    for j in range(d):
        h[j, j] += damp * mean
    return torch.linalg.cholesky(torch.linalg.inv(h), upper=True), dead


def ref_saliency(w, u, dead, c):
    return 0.0 if dead[c] else float(w ** 2 / u[c, c] ** 2)


def ref_sparsegpt(weight, hessians, kept, block, damp, sparsity=None, threshold=None, n_m=None):
    """weight (G, R, D) float64, hessians (G, D, D), kept (G, R, D) bool -> (mask, new weight)."""
    G, R, D = weight.shape
    W, M = weight.clone(), kept.clone()
    W[~M] = 0.0
    factors = [ref_factor(hessians[g], damp) for g in range(G)]
    m = n_m[1] if n_m else 1
    block = -(-block // m) * m
    if sparsity is not None:
        numel, already = W.numel(), int((~M).sum())
        target = min(max(round(sparsity * numel), already), max(numel - 1, already))
        left, pruned = target - already, 0
    for i1 in range(0, D, block):
        i2 = min(i1 + block, D)
        if n_m is None:  # the block's mask, from the saliencies at its start
            candidates = [(ref_saliency(W[g, r, c], factors[g][0], factors[g][1], c), (g * R + r) * (i2 - i1) + c - i1,
                           g, r, c)
                          for g in range(G) for r in range(R) for c in range(i1, i2) if M[g, r, c]]
            if threshold is not None:
                drop = [x for x in candidates if x[0] < threshold]
            else:
                pruned += (i2 - i1) * G * R - len(candidates)
                count = min(max(round(target * i2 / D) - pruned, 0), len(candidates), left)
                pruned, left = pruned + count, left - count
                drop = sorted(candidates)[:count]
            for *_, g, r, c in drop:
                M[g, r, c] = False
        for g in range(G):
            U, dead = factors[g]
            for c in range(i1, i2):
                if n_m and (c - i1) % m == 0:
                    for r in range(R):
                        cols = range(c, c + m)
                        need = (m - n_m[0]) - sum(not M[g, r, k] for k in cols)
                        ranked = sorted((ref_saliency(W[g, r, k], U, dead, k), k) for k in cols if M[g, r, k])
                        for _, k in ranked[:max(need, 0)]:
                            M[g, r, k] = False
                w = W[g, :, c].clone()
                q = torch.where(M[g, :, c], w, torch.zeros_like(w))
                W[g, :, c:] -= torch.outer((w - q) / U[c, c], U[c, c:])
                W[g, :, c] = q
    return M, W


def correlated(rows, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d, dtype=torch.float64) + 0.7 * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    scale = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.1
    return ((torch.randn(rows, d, generator=g, dtype=torch.float64) @ mix) * scale).to(dtype)


def random_kept(shape, seed, fraction=0.2):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= fraction


def assert_matches(mask, weight, ref_mask, ref_weight, original):
    assert torch.equal(mask, ref_mask), f"{int((mask != ref_mask).sum())} mask entries differ"
    # rounding: a few hundred float64 operations per entry, each at 1e-16 of the magnitudes involved
    tolerance = 1e-9 * float(original.abs().mean() + ref_weight.abs().mean())
    assert float((weight - ref_weight).abs().max()) <= tolerance
    assert torch.all(weight[~mask] == 0)


# ---------------------------------------------------------------------------------------------
# Linear against the reference

AMOUNTS = [dict(sparsity=0.0), dict(sparsity=0.3), dict(sparsity=0.5), dict(sparsity=0.9),
           dict(n_m=(2, 4)), dict(n_m=(1, 4)), dict(n_m=(4, 8)), dict(threshold=0.05)]
SHAPES = [(8, 40, 16), (12, 64, 8), (5, 24, 128), (16, 80, 16)]  # (out, in, block_size)


def linear_case(out, d, seed, dead=(), rows=None):
    torch.manual_seed(seed)
    layer = nn.Linear(d, out).double()
    x = correlated(rows or 3 * d, d, seed)
    x[:, list(dead)] = 0.0
    return layer, x


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("amount", AMOUNTS, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_linear_matches_reference(shape, amount):
    out, d, block = shape
    layer, x = linear_case(out, d, seed=d + out)
    crit = tp.importance.SparseGPT(block_size=block)
    half = x.shape[0] // 2
    crit.observe_forward(layer, (x[:half],), None)
    crit.observe_forward(layer, (x[half:].view(3, -1, d),), None)  # batched 3-D input: rows are tokens
    h = 2.0 / x.shape[0] * x.T @ x
    assert torch.allclose(crit.hessian(layer)[0], h, rtol=1e-12, atol=1e-12)
    before = layer.weight.detach().clone()
    mask, weight = crit.reconstruct(layer, "fc", **amount)
    assert torch.equal(layer.weight, before)  # the module is not changed
    ref_mask, ref_weight = ref_sparsegpt(before[None], h[None], torch.ones(1, out, d, dtype=torch.bool), block, 0.01,
                                         **amount)
    assert_matches(mask, weight, ref_mask[0], ref_weight[0], before)
    if "sparsity" in amount:
        assert int((~mask).sum()) == min(round(amount["sparsity"] * mask.numel()), mask.numel() - 1)
    if "n_m" in amount:
        assert torch.all(mask.view(out, -1, amount["n_m"][1]).sum(-1) == amount["n_m"][0])


@pytest.mark.parametrize("amount", [dict(sparsity=0.0), dict(sparsity=0.5), dict(sparsity=0.9), dict(n_m=(2, 4)),
                                    dict(threshold=0.05)], ids=str)
def test_kept_mask_and_dead_inputs_match_reference(amount):
    out, d, block = 10, 48, 16
    layer, x = linear_case(out, d, seed=3, dead=(2, 3, 17, 40))
    kept = random_kept((out, d), seed=4)
    kept[:, 32:] &= random_kept((out, 16), seed=5, fraction=0.5)  # an uneven mask: more pruned in the last block
    crit = tp.importance.SparseGPT(block_size=block, damp=0.05)
    crit.observe_forward(layer, (x,), None)
    h = 2.0 / x.shape[0] * x.T @ x
    before = layer.weight.detach().clone()
    mask, weight = crit.reconstruct(layer, "fc", kept=kept, **amount)
    ref_mask, ref_weight = ref_sparsegpt(before[None], h[None], kept[None], block, 0.05, **amount)
    assert_matches(mask, weight, ref_mask[0], ref_weight[0], before)
    assert not torch.any(mask & ~kept)  # what was pruned stays pruned
    if "sparsity" in amount:
        already = int((~kept).sum())
        assert int((~mask).sum()) == max(round(amount["sparsity"] * mask.numel()), already)
        if amount["sparsity"] >= 0.5:  # dead inputs go first in the blocks that prune (not the last here)
            assert not mask[:, [2, 3, 17]].any()
    assert torch.all(mask[:, [2, 3, 17, 40]] | (weight[:, [2, 3, 17, 40]] == 0))


def test_dead_inputs_are_not_zeroed_when_kept():
    layer, x = linear_case(6, 16, seed=1, dead=(5,))
    crit = tp.importance.SparseGPT()
    crit.observe_forward(layer, (x,), None)
    mask, weight = crit.reconstruct(layer, "fc", sparsity=0.0)
    assert mask.all() and torch.equal(weight[:, 5], layer.weight[:, 5])  # the reference would zero them
    assert torch.all(crit.score(layer)[:, 5] == 0)


def test_unbatched_and_non_tensor_inputs():
    layer, x = linear_case(4, 8, seed=2)
    one, many = tp.importance.SparseGPT(), tp.importance.SparseGPT()
    for row in x:
        one.observe_forward(layer, (row,), None)  # unbatched 1-D inputs
    one.observe_forward(layer, ("not a tensor",), None)
    one.observe_forward(layer, (), None)
    many.observe_forward(layer, (x,), None)
    assert torch.allclose(one.hessian(layer), many.hessian(layer), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# convolutions: the column convention, then against the reference


def ref_conv_rows(conv, x):
    """(groups, rows, columns) by explicit loops: one row per sample and output position, its
    columns kernel position major and input channel minor."""
    spatial = 1 if isinstance(conv, nn.Conv1d) else 2
    x = x.double()
    if x.dim() == spatial + 1:
        x = x[None]
    paddings = (conv.padding,) * spatial if isinstance(conv.padding, str) else tuple(conv.padding)
    pads = []  # F.pad's order: last dim first, (before, after) each
    for k, dil, p in reversed(list(zip(conv.kernel_size, conv.dilation, paddings))):
        total = dil * (k - 1) if p == "same" else 0 if p == "valid" else 2 * p
        pads += [total // 2, total - total // 2]
    x = F.pad(x, pads, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    if spatial == 1:  # height 1
        x = x[:, :, None]
    kernel, stride, dilation = [(1,) * (2 - spatial) + tuple(v) for v in (conv.kernel_size, conv.stride, conv.dilation)]
    per_group = conv.in_channels // conv.groups
    out_h = (x.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (x.shape[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    groups = []
    for g in range(conv.groups):
        rows = []
        for n in range(x.shape[0]):
            for oh in range(out_h):
                for ow in range(out_w):
                    rows.append(torch.cat([
                        x[n, g * per_group:(g + 1) * per_group, oh * stride[0] + kh * dilation[0],
                          ow * stride[1] + kw * dilation[1]]
                        for kh in range(kernel[0]) for kw in range(kernel[1])]))
        groups.append(torch.stack(rows))
    return torch.stack(groups)


def ref_conv_columns(conv):
    w = conv.weight.detach()
    per_group = w.shape[0] // conv.groups
    w = w.permute(0, *range(2, w.dim()), 1)  # (out, *kernel, in / groups)
    return w.reshape(conv.groups, per_group, -1)


CONVS = [
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7), dict(sparsity=0.5)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding="same", padding_mode="reflect"), (2, 4, 7, 7),
     dict(n_m=(1, 2))),
    (lambda: nn.Conv2d(4, 4, 3, groups=4, padding="same"), (2, 4, 6, 6), dict(sparsity=0.3)),
    (lambda: nn.Conv2d(8, 4, (2, 3), stride=(1, 2), padding=(1, 2), padding_mode="circular"), (8, 5, 6),
     dict(n_m=(2, 4))),
    (lambda: nn.Conv2d(4, 6, 2, padding="valid", bias=False), (2, 4, 5, 5), dict(threshold=0.02)),
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2), (3, 4, 16), dict(sparsity=0.5)),
    (lambda: nn.Conv1d(4, 4, 2, groups=2, padding="same", padding_mode="replicate"), (4, 12), dict(threshold=0.05)),
]


@pytest.mark.parametrize("make,input_shape,amount", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
def test_conv_matches_reference(make, input_shape, amount):
    torch.manual_seed(len(input_shape) + input_shape[-1])
    conv = make().double()
    x = torch.randn(input_shape, dtype=torch.float64)
    rows = ref_conv_rows(conv, x)
    # the column convention: columns (kernel position major, channel minor) times rows = the conv
    bias = 0 if conv.bias is None else conv.bias.detach().view(conv.groups, -1, 1)
    out = (torch.bmm(ref_conv_columns(conv), rows.transpose(1, 2)) + bias).reshape(conv.out_channels, -1)
    expected = conv(x if x.dim() == conv.weight.dim() else x[None]).detach()
    assert torch.allclose(out.view(conv.out_channels, expected.shape[0], -1).transpose(0, 1).reshape(expected.shape),
                          expected, atol=1e-10)
    assert torch.allclose(sg.input_columns(conv, x), rows, atol=1e-12)
    assert torch.equal(sg.weight_columns(conv.weight, conv.groups), ref_conv_columns(conv))

    crit = tp.importance.SparseGPT(block_size=8)
    crit.observe_forward(conv, (x,), None)
    h = 2.0 / rows.shape[1] * rows.transpose(1, 2) @ rows
    assert torch.allclose(crit.hessian(conv), h, rtol=1e-12, atol=1e-12)
    mask, weight = crit.reconstruct(conv, "conv", **amount)
    ref_mask, ref_weight = ref_sparsegpt(ref_conv_columns(conv), h, torch.ones_like(ref_conv_columns(conv), dtype=bool),
                                         8, 0.01, **amount)
    columns = sg.weight_columns
    assert_matches(columns(mask, conv.groups), columns(weight, conv.groups), ref_mask, ref_weight, conv.weight.detach())
    assert mask.shape == weight.shape == conv.weight.shape


# ---------------------------------------------------------------------------------------------
# precisions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("amount", [dict(sparsity=0.5), dict(sparsity=0.7), dict(n_m=(2, 4))], ids=str)
def test_low_precision_dtype_zeros_and_counts(dtype, amount):
    layer, x = linear_case(16, 64, seed=6)
    layer = layer.to(dtype)
    crit = tp.importance.SparseGPT(block_size=16)
    crit.observe_forward(layer, (x.to(dtype),), None)
    mask, weight = crit.reconstruct(layer, "fc", **amount)
    assert weight.dtype == dtype and mask.dtype == torch.bool and weight.shape == layer.weight.shape
    assert torch.all(weight[~mask] == 0) and torch.isfinite(weight).all()
    if "sparsity" in amount:
        assert int((~mask).sum()) == round(amount["sparsity"] * mask.numel())
    else:
        assert torch.all(mask.view(16, -1, 4).sum(-1) == 2)
    assert crit.score(layer).dtype == torch.float32


@pytest.mark.parametrize("amount", [dict(sparsity=0.5), dict(n_m=(2, 4))], ids=str)
def test_float32_agrees_with_float64(amount):
    """float32 decides a weight differently from float64 only where two saliencies compete within
    float32 rounding (~1e-7 relative, grown by the updates through 128 columns to ~1e-5 at worst);
    with ~1,000 candidates per block, the gap between neighbours at a block's cut is ~1e-3 relative,
    so a flip is rare, and each flip moves the later updates a little, flipping a few more at most:
    at least 99% of the mask agrees (all of it here, in practice). The output error, a sum over
    everything, agrees to 1e-4 relative (1e-8 in practice)."""
    layer64, x = linear_case(32, 128, seed=7, rows=512)
    layer32 = nn.Linear(128, 32).float()
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    results = []
    for layer, dtype in ((layer64, torch.float64), (layer32, torch.float32)):
        crit = tp.importance.SparseGPT(block_size=32)
        crit.observe_forward(layer, (x.to(dtype),), None)
        mask, weight = crit.reconstruct(layer, "fc", **amount)
        error = float((x @ (layer64.weight.detach() - weight.double()).T).norm())
        results.append((mask, error))
    (mask64, error64), (mask32, error32) = results
    assert float((mask64 == mask32).double().mean()) >= 0.99
    assert abs(error32 - error64) <= 1e-4 * error64


# ---------------------------------------------------------------------------------------------
# quality


def test_output_error_below_magnitude_and_wanda():
    """Inputs correlated as a layer's usually are (16 latent factors over 64 features, plus noise):
    reconstructing the kept weights should more than halve the output error of either mask alone."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(512, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 64, generator=g, dtype=torch.float64)
    x = x / 4 + 0.1 * torch.randn(512, 64, generator=g, dtype=torch.float64)
    torch.manual_seed(8)
    layer = nn.Linear(64, 32).double()
    weight = layer.weight.detach()
    crit = tp.importance.SparseGPT()
    crit.observe_forward(layer, (x,), None)
    _, sparsegpt_weight = crit.reconstruct(layer, "fc", sparsity=0.5)
    magnitude = weight * selection.by_ratio(weight.abs(), None, 0.5)
    wanda = tp.importance.Wanda()
    wanda.observe_forward(layer, (x,), None)
    wanda_weight = weight * selection.by_row_ratio(wanda.score(layer), None, 0.5)

    def error(w):
        return float((x @ weight.T - x @ w.T).norm())

    assert error(sparsegpt_weight) < 0.5 * min(error(magnitude), error(wanda_weight))


# ---------------------------------------------------------------------------------------------
# damping and errors


def rank_deficient_layer():
    """A Linear whose H has two identical columns (6 and 7), in exact arithmetic: 8 rows, so 2/n
    and every square root along the factorization are exact and the undamped pivot is exactly 0."""
    x = torch.zeros(8, 8, dtype=torch.float64)
    for j in range(6):
        x[j, j] = 1.0
    x[6, 6] = x[6, 7] = 1.0
    torch.manual_seed(9)
    return nn.Linear(8, 3).double(), x


def test_rank_deficient_without_damping_warns_then_succeeds():
    layer, x = rank_deficient_layer()
    crit = tp.importance.SparseGPT(damp=0)
    crit.observe_forward(layer, (x,), None)
    with pytest.warns(RuntimeWarning, match=r"layer 'block.fc'.*damp=\[0\.0\]; used damp=1e-06"):
        mask, weight = crit.reconstruct(layer, "block.fc", sparsity=0.5)
    assert torch.isfinite(weight).all() and int((~mask).sum()) == 12


def test_factorization_that_keeps_failing_raises(monkeypatch):
    monkeypatch.setattr(sg, "_RETRIES", 0)
    layer, x = rank_deficient_layer()
    crit = tp.importance.SparseGPT(damp=0)
    crit.observe_forward(layer, (x,), None)
    with pytest.raises(RuntimeError, match="layer 'block.fc' is not positive definite even with damp"):
        crit.reconstruct(layer, "block.fc", sparsity=0.5)


def test_nan_input_raises_naming_the_layer_and_changes_nothing():
    layer, x = linear_case(4, 8, seed=10)
    x[3, 2] = float("nan")
    crit = tp.importance.SparseGPT()
    crit.observe_forward(layer, (x,), None)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="Hessian of layer 'enc.fc' is not finite"):
        crit.reconstruct(layer, "enc.fc", sparsity=0.5)
    assert torch.equal(layer.weight, before)


def test_never_observed_says_what_to_do():
    layer = nn.Linear(8, 4)
    crit = tp.importance.SparseGPT()
    with pytest.raises(RuntimeError, match="no calibration statistics for layer 'fc': pass `data`"):
        crit.reconstruct(layer, "fc", sparsity=0.5)
    with pytest.raises(RuntimeError, match="pass\n?.*`data`"):
        crit.hessian(layer)


def test_bad_arguments_name_themselves():
    for kwargs, error, name in [(dict(block_size=0), ValueError, "block_size"), (dict(block_size=2.0), TypeError,
                                "block_size"), (dict(block_size=True), TypeError, "block_size"),
                                (dict(damp=-0.1), ValueError, "damp"), (dict(damp=float("nan")), ValueError, "damp"),
                                (dict(damp="0.1"), TypeError, "damp")]:
        with pytest.raises(error, match=f"`{name}`"):
            tp.importance.SparseGPT(**kwargs)
    layer, x = linear_case(4, 6, seed=11)
    crit = tp.importance.SparseGPT()
    crit.observe_forward(layer, (x,), None)
    for kwargs, error, match in [(dict(), ValueError, "exactly one"), (dict(sparsity=0.5, n_m=(2, 4)), ValueError,
                                 "exactly one"), (dict(sparsity=1.0), ValueError, "`sparsity`"),
                                 (dict(threshold=float("inf")), ValueError, "`threshold`"),
                                 (dict(n_m=(2, 4)), ValueError, "M=4 to divide the input size of layer 'fc'"),
                                 (dict(n_m=(3, 2)), ValueError, "`n_m`"),
                                 (dict(sparsity=0.5, kept=torch.ones(4, 5, dtype=torch.bool)), ValueError, "`kept`"),
                                 (dict(sparsity=0.5, kept=[[True] * 6] * 4), TypeError, "`kept`")]:
        with pytest.raises(error, match=match):
            crit.reconstruct(layer, "fc", **kwargs)
    with pytest.raises(TypeError, match="Linear, Conv1d and Conv2d layers, got Conv3d"):
        crit.observe_forward(nn.Conv3d(2, 2, 1), (torch.zeros(1, 2, 2, 2, 2),), None)


# ---------------------------------------------------------------------------------------------
# score, state, registration


def test_score_is_the_obs_saliency():
    layer, x = linear_case(6, 20, seed=12, dead=(4, 11))
    crit = tp.importance.SparseGPT(damp=0.02)
    crit.observe_forward(layer, (x,), None)
    scores = crit.score(layer)
    assert scores.shape == layer.weight.shape and scores.dtype == torch.float64
    u, dead = ref_factor(2.0 / x.shape[0] * x.T @ x, 0.02)
    w = layer.weight.detach()
    expected = torch.tensor([[ref_saliency(w[r, c], u, dead, c) for c in range(20)] for r in range(6)],
                            dtype=torch.float64)
    assert torch.allclose(scores, expected, rtol=1e-10, atol=0)
    assert torch.all(scores[:, [4, 11]] == 0)


def test_masked_layer_keeps_its_mask_by_default():
    layer, x = linear_case(6, 16, seed=13)
    kept = random_kept((6, 16), seed=14, fraction=0.3)
    crit = tp.importance.SparseGPT()
    crit.observe_forward(layer, (x,), None)
    explicit = crit.reconstruct(layer, "fc", sparsity=0.5, kept=kept)
    attach_mask(layer, kept)
    mask, weight = crit.reconstruct(layer, "fc", sparsity=0.5)
    assert torch.equal(mask, explicit[0]) and torch.equal(weight, explicit[1])
    assert torch.all(crit.score(layer)[~kept] == 0)  # scored on the effective weight


def test_state_dict_round_trip_and_rank_average():
    layer, x = linear_case(4, 12, seed=15)
    ranks = [tp.importance.SparseGPT(), tp.importance.SparseGPT()]
    ranks[0].observe_forward(layer, (x[:20],), None)
    ranks[1].observe_forward(layer, (x[20:],), None)
    states = [r.state_dict({"fc": layer}) for r in ranks]
    assert set(states[0]["fc"]) == {"gram", "rows"} and states[0]["fc"]["gram"].dtype == torch.float64
    # what distributed.average_importance_state does: the mean of every floating tensor
    averaged = {"fc": {k: (states[0]["fc"][k] + states[1]["fc"][k]) / 2 for k in states[0]["fc"]}}
    merged = tp.importance.SparseGPT()
    merged.load_state_dict(averaged, {"fc": layer})
    assert torch.allclose(merged.hessian(layer)[0], 2.0 / x.shape[0] * x.T @ x, rtol=1e-12)
    resumed = tp.importance.SparseGPT()
    resumed.load_state_dict(states[0], {"fc": layer})
    assert torch.equal(resumed.hessian(layer), ranks[0].hessian(layer))
    ranks[0].reset()
    assert not ranks[0].observed(layer) and resumed.observed(layer)


def test_registered_by_name():
    crit = tp.importance.resolve("sparsegpt")
    assert isinstance(crit, tp.importance.SparseGPT) and crit.block_size == 128 and crit.damp == 0.01
    assert crit.reconstructs and crit.sequential_default and crit.requires_data and not crit.requires_loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert repr(crit) == "SparseGPT(block_size=128, damp=0.01)"
