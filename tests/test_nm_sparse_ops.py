"""nm_sparse_linear (csrc/cpu/nm_sparse_linear.cpp, nm_avx2.cpp; autograd in
csrc/autograd/sparse_ops.cpp) and the Python side of the N:8 format (torchprune/ops/nm.py).

Forward: the fp32 AVX2 kernel (n in {1, 2, 4}, fewer than 16 rows of x: passes of 1 to 4 rows,
chunks of 8 slots, the scalar tail when in_features / 8 * n is not a multiple of 8), the portable
loop (other n, float64, and the AVX2 kernel switched off by TORCHPRUNE_PORTABLE=1 /
TORCHPRUNE_NO_AVX2=1 in a subprocess) and the CSR path (16 rows of x or more: the weight rewritten as CSR for
sparse_linear's kernel), against
float64 references. Tolerances come from the rounding bound of each dot product
(tests/error_bounds.py), with the slots of a row (plus the bias) as the dot length. Backward:
gradcheck and gradgradcheck in float64, and the float32 gradients against those of the dense
F.linear, the value gradient gathered at the slots' columns.
"""

import doctest

import pytest
import torch
import torch.nn.functional as F

from torchprune import ops as _ops
from torchprune.ops.nm import check_nm, nm_slots, pack_nm, unpack_nm

from conftest import avx2_kernels_on, run_op_switched
from error_bounds import assert_close, assert_close_bounded, bilinear_references

OPS = torch.ops.torchprune
# the start of the shape errors (check_nm and the op say the same of `values`)
CODES_SHAPE = "`codes` must be \\[out_features, ceil\\(slots / 8\\)\\]"
VALUES_SHAPE = "`values` must be \\[out_features, in_features / 8 \\* n\\]"


def nm_mask(out, k, n, g, full_row=0, empty_row=1):
    """A bool [out, k] pattern with at most n kept in every aligned window of 8 columns: each window
    keeps a random count in 0..n at random positions; row `full_row` keeps n in every window, row
    `empty_row` nothing (when the layer has those rows)."""
    windows = k // 8
    counts = torch.randint(0, n + 1, (out, windows, 1), generator=g)
    if out > full_row:
        counts[full_row] = n
    if out > empty_row:
        counts[empty_row] = 0
    rank = torch.rand(out, windows, 8, generator=g).argsort(-1).argsort(-1)
    return (rank < counts).reshape(out, k)


def nm_weight(out, k, n, g, dtype=torch.float32):
    """A dense random weight (nonzero everywhere) and an N:8 keep pattern for it."""
    return torch.randn(out, k, generator=g, dtype=dtype), nm_mask(out, k, n, g)


def pack(w, n, keep):
    """pack_nm(w, n, keep); for a layer without output features (which pack_nm cannot pack, see
    test_pack_unpack_check_without_output_features) the empty tensors built by hand."""
    if w.shape[0] == 0:
        slots = w.shape[1] // 8 * n
        return torch.zeros(0, -(-slots // 8), dtype=torch.int32), torch.zeros(0, slots, dtype=w.dtype)
    return pack_nm(w, n, keep)


def slot_columns(codes, n, in_features):
    """The input column of every slot [out, slots], decoded here (not by nm.py)."""
    rows, chunks = codes.shape
    slots = in_features // 8 * n
    positions = (codes.long().unsqueeze(-1) >> (3 * torch.arange(8))) & 7
    return positions.reshape(rows, chunks * 8)[:, :slots] + torch.arange(slots) // n * 8


def assert_bounded(y, x, w, keep, n, b=None, msg="output"):
    """y is x @ where(keep, w, 0).T + b within the rounding bound of y.dtype (halves: accumulated
    in float32) for a sum of in_features / 8 * n slots plus the bias."""
    masked = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    (expected, _), (magnitude, _), _ = bilinear_references(F.linear, (x, masked, b))
    terms = w.shape[1] // 8 * n + (b is not None)
    assert_close_bounded(y, expected, magnitude, terms, y.dtype, msg)


def run(x, w, keep, n, b=None):
    codes, values = pack(w, n, keep)
    return _ops.nm_sparse_linear(x, codes, values, w.shape[1], b)


# ---------------------------------------------------------------------------------------------
# Forward vs float64

SLOTS = [1, 2, 3, 4, 5, 6, 7, 8]
# rows of x: the AVX2 kernel's passes of 1, 2, 3, 4 rows and their mixes (5 = 4 + 1, 7 = 4 + 3,
# 15 = 4 + 4 + 4 + 3), then the CSR path from 16 on; none
ROWS = [0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 64]
# in_features: none, one window, and slots per row (in / 8 * n) that leave the AVX2 kernel a
# scalar tail for some n (24: 3n slots, 40: 5n) or run several unrolled chunks (384)
COLUMNS = [0, 8, 16, 24, 40, 64, 384]
OUT_FEATURES = [0, 1, 3, 8, 9, 33, 70]


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n", SLOTS)
def test_forward_matches_float64(n, m):
    """Every in_features for each (n, rows of x), out_features rotating across them, in float32
    and float64, with and without a bias."""
    g = torch.Generator().manual_seed(100 * n + m)
    shift = ROWS.index(m)
    for i, k in enumerate(COLUMNS):
        out = OUT_FEATURES[(i + shift) % len(OUT_FEATURES)]
        for j, dtype in enumerate((torch.float32, torch.float64)):
            w, keep = nm_weight(out, k, n, g, dtype)
            x = torch.randn(m, k, generator=g, dtype=dtype)
            b = torch.randn(out, generator=g, dtype=dtype) if (i + j + shift) % 2 else None
            y = run(x, w, keep, n, b)
            assert y.shape == (m, out) and y.dtype == dtype
            assert_bounded(y, x, w, keep, n, b, f"n={n} m={m} in={k} out={out} {dtype} bias={b is not None}")


def non_contiguous_inputs(shape, g, dtype):
    """x of `shape`, laid out ways that are not contiguous."""
    *lead, k = shape
    yield "every other column", torch.randn(*lead, 2 * k, generator=g, dtype=dtype)[..., ::2]
    yield "transposed", torch.randn(*reversed(shape), generator=g, dtype=dtype).permute(
        *reversed(range(len(shape))))
    yield "row-sliced", torch.randn(*lead[:-1], 2 * lead[-1], k, generator=g, dtype=dtype)[..., ::2, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_leading_dims_and_non_contiguous_input(n, dtype):
    """x (2, 3, in) (6 rows: a pass of 4 and one of 2), (2, 9, in) (the CSR path), (1, in)
    and 1-D (in,); a strided bias."""
    g = torch.Generator().manual_seed(5 + n)
    for k in (24, 384):
        w, keep = nm_weight(9, k, n, g, dtype)
        b = torch.randn(18, generator=g, dtype=dtype)[::2]
        for shape in ((2, 3, k), (2, 9, k), (1, k), (k,)):
            x = torch.randn(shape, generator=g, dtype=dtype)
            y = run(x, w, keep, n, b)
            assert y.shape == (*shape[:-1], 9)
            assert_bounded(y, x, w, keep, n, b, f"shape {shape}")
            for how, x in non_contiguous_inputs(shape, g, dtype) if len(shape) == 3 else ():
                assert not x.is_contiguous()
                assert_bounded(run(x, w, keep, n, b), x, w, keep, n, b, f"{how} {shape}")


@pytest.mark.parametrize("m", [1, 4, 20])
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8), (2, 8), (1, 2)])
def test_n_m_masks_pack_with_n_8n_over_m(pattern, m):
    """An N:M mask (N of every M consecutive columns) is an n:8 one with n = 8N / M: nm_slots says
    so, it packs with that n and the product is right."""
    big_n, big_m = pattern
    n = 8 * big_n // big_m
    g = torch.Generator().manual_seed(big_n * 10 + big_m + m)
    out, k = 12, 64
    keep = (torch.rand(out, k // big_m, big_m, generator=g).argsort(-1).argsort(-1) < big_n).reshape(out, k)
    w = torch.randn(out, k, generator=g)
    assert nm_slots(keep) == n
    codes, values = pack_nm(w, n, keep)
    assert values.shape == (out, k // 8 * n)
    assert torch.equal(unpack_nm(codes, values, k), torch.where(keep, w, 0.0))
    x, b = torch.randn(m, k, generator=g), torch.randn(out, generator=g)
    assert_bounded(_ops.nm_sparse_linear(x, codes, values, k, b), x, w, keep, n, b)


# ---------------------------------------------------------------------------------------------
# Half precision

@pytest.mark.parametrize("m", [1, 5, 20])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(dtype, n, m):
    """The float32 op on the same (converted) inputs, rounded once: bit for bit, and within one
    rounding to the half dtype of the float64 reference."""
    g = torch.Generator().manual_seed(n + m)
    w, keep = nm_weight(33, 384, n, g)
    w, x, b = w.to(dtype), torch.randn(m, 384, generator=g).to(dtype), torch.randn(33, generator=g).to(dtype)
    codes, values = pack_nm(w, n, keep)
    assert values.dtype == dtype
    for bias in (b, None):
        y = _ops.nm_sparse_linear(x, codes, values, 384, bias)
        assert y.dtype == dtype
        as_float = _ops.nm_sparse_linear(x.float(), codes, values.float(), 384,
                                         None if bias is None else bias.float())
        assert torch.equal(y, as_float.to(dtype))
        assert_bounded(y, x, w, keep, n, bias, f"bias={bias is not None}")


# ---------------------------------------------------------------------------------------------
# Threads

@pytest.mark.parametrize("m", [1, 5, 20])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_one_or_two_threads_give_the_same_result(n, m):
    """Threads split weight rows, never a dot product: below 16 rows of x (the N:8 kernels) the bits
    cannot depend on them; the CSR path is only held to the bound. The layer is large
    enough for the op to use both threads."""
    g = torch.Generator().manual_seed(3 + n + m)
    w, keep = nm_weight(520, 512, n, g)
    x, b = torch.randn(m, 512, generator=g), torch.randn(520, generator=g)
    codes, values = pack_nm(w, n, keep)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops.nm_sparse_linear(x, codes, values, 512, b)
        torch.set_num_threads(2)
        two = _ops.nm_sparse_linear(x, codes, values, 512, b)
    finally:
        torch.set_num_threads(before)
    assert_bounded(one, x, w, keep, n, b, "1 thread")
    assert_bounded(two, x, w, keep, n, b, "2 threads")
    if m < 16:
        assert torch.equal(one, two)


# ---------------------------------------------------------------------------------------------
# The portable loop (AVX2 kernel switched off) agrees with the AVX2 kernel

PORTABLE_CASES = [  # (n, m, out, in, dtype)
    (4, 1, 64, 384, torch.float32), (2, 2, 33, 40, torch.float32), (1, 3, 9, 64, torch.float32),
    (4, 5, 70, 24, torch.float32), (1, 15, 8, 384, torch.float32), (2, 4, 16, 8, torch.float32),
    (3, 3, 9, 40, torch.float32), (4, 2, 9, 64, torch.float64), (2, 17, 33, 64, torch.float32),
]


@pytest.mark.parametrize("switch", ["TORCHPRUNE_PORTABLE", "TORCHPRUNE_NO_AVX2"])
def test_portable_loop_matches_avx2(switch, tmp_path):
    g = torch.Generator().manual_seed(6)
    cases, dense = [], []
    for n, m, out, k, dtype in PORTABLE_CASES:
        w, keep = nm_weight(out, k, n, g, dtype)
        x, b = torch.randn(m, k, generator=g, dtype=dtype), torch.randn(out, generator=g, dtype=dtype)
        cases.append((x, *pack_nm(w, n, keep), k, b))
        dense.append((w, keep))
    portable = run_op_switched("nm_sparse_linear", cases, switch, tmp_path)
    differs = False
    for (x, codes, values, k, b), (w, keep), y_portable, case in zip(cases, dense, portable, PORTABLE_CASES):
        n, m, _, _, dtype = case
        y = _ops.nm_sparse_linear(x, codes, values, k, b)
        assert_bounded(y, x, w, keep, n, b, f"default {case}")
        assert_bounded(y_portable, x, w, keep, n, b, f"{switch}=1 {case}")
        if m >= 16:  # the CSR path in both (sparse_linear's own kernels, switched by the same variables)
            continue
        if n in (1, 2, 4) and dtype == torch.float32:
            differs |= not torch.equal(y, y_portable)
        else:  # the portable loop runs in both processes
            assert torch.equal(y, y_portable), case
    if avx2_kernels_on():
        # The two paths sum in different orders (8 lanes, several accumulators, FMA vs one running
        # sum): if every bit agreed, the switch would not have reached the op.
        assert differs, f"{switch}=1 gave the AVX2 kernel's bits on every case: the switch had no effect"


# ---------------------------------------------------------------------------------------------
# Gradients

def gradcheck_args(n, m, bias, g):
    w, keep = nm_weight(5, 16, n, g, torch.float64)
    codes, values = pack_nm(w, n, keep)
    x = torch.randn(m, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    return x, codes, values.requires_grad_(), b


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("n", [1, 3, 4, 8])
def test_gradcheck(n, m, bias):
    """m = 1 and 3: the kernel's forward (portable in float64), m = 20: the CSR path."""
    g = torch.Generator().manual_seed(10 * n + m)
    x, codes, values, b = gradcheck_args(n, m, bias, g)
    fn = lambda x_, v_, *b_: _ops.nm_sparse_linear(x_, codes, v_, 16, *b_)  # noqa: E731
    inputs = (x, values, b) if bias else (x, values)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_gradients_match_dense(n, m, create_graph):
    """float32 x.grad, values.grad and bias.grad vs the float64 gradients of F.linear with the
    dense weight: the value gradient is the dense weight's gradient at each slot's column (the
    zero-padded slots included), within the float32 rounding bounds."""
    g = torch.Generator().manual_seed(7 * n + m)
    for out, k in ((9, 40), (33, 384)):
        w, keep = nm_weight(out, k, n, g)
        codes, values = pack_nm(w, n, keep)
        dense = unpack_nm(codes, values, k)
        x, b = torch.randn(2, m, k, generator=g), torch.randn(out, generator=g)
        xs, vs, bs = x.clone().requires_grad_(), values.clone().requires_grad_(), b.clone().requires_grad_()
        y = _ops.nm_sparse_linear(xs, codes, vs, k, bs)
        grad = torch.randn(y.shape, generator=g)
        grads = torch.autograd.grad(y, (xs, vs, bs), grad, create_graph=create_graph)
        (_, want), (_, mags), (_, terms) = bilinear_references(F.linear, (x, dense, b), grad)
        columns = slot_columns(codes, n, k)
        check = assert_close(torch.float32)
        check(grads[0], want[0], mags[0], terms[0], "grad_x")
        check(grads[1], want[1].gather(1, columns), mags[1].gather(1, columns), terms[1].gather(1, columns),
              "grad_values")
        check(grads[2], want[2], mags[2], terms[2], "grad_bias")


@pytest.mark.parametrize("wanted", ["x", "values", "bias", "x+bias", "values+bias"])
def test_only_the_gradients_asked_for(wanted):
    """Each gradient on its own (the others' inputs not requiring grad) equals the one computed
    with all three, and nothing is computed for the rest."""
    g = torch.Generator().manual_seed(8)
    w, keep = nm_weight(32, 64, 4, g)
    codes, values = pack_nm(w, 4, keep)
    x, b = torch.randn(9, 64, generator=g), torch.randn(32, generator=g)
    grad = torch.randn(9, 32, generator=g)
    inputs = dict(x=x, values=values, bias=b)
    leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    _ops.nm_sparse_linear(leaves["x"], codes, leaves["values"], 64, leaves["bias"]).backward(grad)
    some = {name: t.clone().requires_grad_(name in wanted.split("+")) for name, t in inputs.items()}
    _ops.nm_sparse_linear(some["x"], codes, some["values"], 64, some["bias"]).backward(grad)
    for name in inputs:
        if name in wanted.split("+"):
            assert torch.equal(some[name].grad, leaves[name].grad), name
        else:
            assert some[name].grad is None, name


# ---------------------------------------------------------------------------------------------
# pack_nm / unpack_nm / check_nm / nm_slots

@pytest.mark.parametrize("n", SLOTS)
def test_pack_unpack_round_trip(n):
    """unpack(pack(w, n, mask)) is where(mask, w, 0) bit for bit (the dense w's unkept entries
    dropped); the layout is nm.h's: values[r, s] = W[r, (s / n) * 8 + position(s)], positions
    ascending within each window, the kept ones plus the lowest free ones holding zeros."""
    g = torch.Generator().manual_seed(n)
    for k in (8, 24, 40, 384):
        w, keep = nm_weight(7, k, n, g, torch.float64)
        codes, values = pack_nm(w, n, keep)
        slots = k // 8 * n
        assert codes.dtype == torch.int32 and codes.shape == (7, -(-slots // 8)) and codes.is_contiguous()
        assert values.dtype == torch.float64 and values.shape == (7, slots) and values.is_contiguous()
        assert check_nm(codes, values, k) == n
        masked = torch.where(keep, w, 0.0)
        assert torch.equal(unpack_nm(codes, values, k), masked)
        # without a mask: the nonzeros
        assert all(torch.equal(a, b) for a, b in zip(pack_nm(masked, n), (codes, values)))
        # the code bits past the last slot are zero
        used = (slots - (codes.shape[1] - 1) * 8) * 3
        assert int(((codes[:, -1].long() & 0xFFFFFFFF) >> used).max()) == 0
        assert not ((codes[:, :-1].long() & 0xFFFFFFFF) >> 24).any()
        columns = slot_columns(codes, n, k)
        assert torch.equal(values, masked.gather(1, columns))
        positions = (columns % 8).reshape(7, k // 8, n)
        assert bool((positions.diff(dim=-1) > 0).all())
        windows = keep.reshape(7, k // 8, 8)
        for r in range(7):
            for j in range(k // 8):
                kept = windows[r, j].nonzero().flatten().tolist()
                free = [p for p in range(8) if p not in kept][: n - len(kept)]
                assert positions[r, j].tolist() == sorted(kept + free), (r, j)
                stored = values[r, j * n:(j + 1) * n]
                assert torch.equal(stored[~keep[r, columns[r, j * n:(j + 1) * n]]], stored.new_zeros(n - len(kept)))


def test_pack_with_mask_stores_kept_zeros():
    """A kept weight that is zero has a slot; an unkept nonzero has none."""
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    mask = torch.tensor([[True, True, False, False, False, False, True, False]])
    codes, values = pack_nm(w, 3, mask)
    assert values.tolist() == [[0.0, 1.0, 0.0]]
    assert [(int(codes[0, 0]) >> (3 * i)) & 7 for i in range(3)] == [0, 1, 6]
    assert int(codes[0, 0]) >> 9 == 0


def test_pack_picks_the_fewest_slots():
    g = torch.Generator().manual_seed(2)
    for n in SLOTS:
        keep = nm_mask(6, 40, n, g)
        w = torch.randn(6, 40, generator=g) * keep
        assert nm_slots(keep) == n  # row 0 keeps n in every window
        codes, values = pack_nm(w)
        assert values.shape == (6, 5 * n) and check_nm(codes, values, 40) == n
        assert torch.equal(unpack_nm(codes, values, 40), w)
    codes, values = pack_nm(torch.zeros(3, 16))  # nothing kept: one slot per window, zeros
    assert values.shape == (3, 2) and not values.any() and codes.shape == (3, 1)


def test_nm_slots():
    g = torch.Generator().manual_seed(3)
    assert nm_slots(nm_mask(4, 24, 3, g)) == 3
    assert nm_slots(torch.zeros(4, 16, dtype=torch.bool)) == 1
    assert nm_slots(torch.ones(4, 16, dtype=torch.bool)) is None  # dense
    assert nm_slots(torch.eye(4, 12, dtype=torch.bool)) is None  # in_features not a multiple of 8
    assert nm_slots(torch.zeros(4, 0, dtype=torch.bool)) is None
    assert nm_slots(torch.zeros(16, dtype=torch.bool)) is None  # not 2-D
    full = torch.ones(4, 16, dtype=torch.bool)
    full[1, 3] = False
    assert nm_slots(full) == 8


def test_pack_docstring_example():
    codes, values = pack_nm(torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0]]), 4)
    assert values.tolist() == [[0.0, 1.0, 2.0, 3.0]]
    assert [(int(codes[0, 0]) >> (3 * i)) & 7 for i in range(4)] == [0, 1, 3, 4]
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(pack_nm, "pack_nm", globs={"torch": torch, "pack_nm": pack_nm}):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: pack_nm(w[:, :12], 2), "in_features = 12 must be a multiple of 8"),
        (lambda w: pack_nm(w, 0), "`n` must be an int in 1..8"),
        (lambda w: pack_nm(w, 9), "`n` must be an int in 1..8"),
        (lambda w: pack_nm(w, -1), "`n` must be an int in 1..8"),
        (lambda w: pack_nm(w, True), "`n` must be an int in 1..8"),
        (lambda w: pack_nm(w, 2.0), "`n` must be an int in 1..8"),
        (lambda w: pack_nm(w, "2"), "`n` must be an int in 1..8"),
        (lambda w: pack_nm(w, 2), "keeps 8 weights, more than n = 2"),  # the dense weight's nonzeros
        (lambda w: pack_nm(w, 2, torch.arange(16).expand(4, 16) % 8 < 3), "keeps 3 weights, more than n = 2"),
        (lambda w: pack_nm(w, 2, torch.ones(4, 8, dtype=torch.bool)), "`mask` must be a bool tensor"),
        (lambda w: pack_nm(w, 2, torch.ones(4, 16)), "`mask` must be a bool tensor"),
        (lambda w: pack_nm(w.flatten(), 2), "`weight` must be a 2-D tensor"),
        (lambda w: pack_nm(w.reshape(2, 2, 16), 2), "`weight` must be a 2-D tensor"),
    ],
)
def test_pack_refuses(call, message):
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match=message):
        call(w)


def valid_nm():
    """4 rows, in_features 24, n = 3: 9 slots a row, the third window straddling two codes."""
    g = torch.Generator().manual_seed(4)
    w, keep = nm_weight(4, 24, 3, g)
    return pack_nm(w, 3, keep)


def set_position(codes, row, slot, position):
    codes = codes.clone()
    value = int(codes[row, slot // 8]) & 0xFFFFFFFF
    value = (value & ~(7 << (3 * (slot % 8)))) | (position << (3 * (slot % 8)))
    codes[row, slot // 8] = value - (1 << 32) if value >= 1 << 31 else value
    return codes


def positions_of(codes, row, slots):
    return [(int(codes[row, s // 8]) >> (3 * (s % 8))) & 7 for s in slots]


def descending(p):
    codes, values = p
    first, second = positions_of(codes, 2, (3, 4))
    return set_position(set_position(codes, 2, 3, second), 2, 4, first), values


def repeated(p):
    codes, values = p
    return set_position(codes, 1, 7, positions_of(codes, 1, (6,))[0]), values  # slots 6, 7: one window


def beyond_last_slot(p):
    codes, values = p
    codes = codes.clone()
    codes[0, 1] |= 1 << 3  # the last code holds slot 8 only: bits 3.. unused
    return codes, values


def beyond_full_code(p):
    codes, values = p
    codes = codes.clone()
    codes[3, 0] |= -(1 << 31)  # the top bit of a full code
    return codes, values


@pytest.mark.parametrize(
    "change, message",
    [
        (descending, "ascend"),
        (repeated, "ascend"),
        (beyond_last_slot, "bits set beyond"),
        (beyond_full_code, "bits set beyond"),
        (lambda p: (p[0][:, :1].contiguous(), p[1]), "`codes` must be an int32"),
        (lambda p: (p[0][:3], p[1]), "`codes` must be an int32"),
        (lambda p: (p[0].long(), p[1]), "`codes` must be an int32"),
        (lambda p: (p[0], p[1][:, :8]), VALUES_SHAPE),
        (lambda p: (p[0], p[1].flatten()), "`values` must be a 2-D floating-point"),
        (lambda p: (p[0], p[1].int()), "`values` must be a 2-D floating-point"),
    ],
)
def test_check_nm_refuses(change, message):
    codes, values = valid_nm()
    assert check_nm(codes, values, 24) == 3  # the valid one passes
    with pytest.raises(ValueError, match=message):
        check_nm(*change((codes, values)), 24)


def test_check_nm_refuses_in_features():
    codes, values = valid_nm()
    for k in (20, -8, 24.0, True):
        with pytest.raises(ValueError, match="`in_features` must be an int >= 0 and a multiple of 8"):
            check_nm(codes, values, k)
    with pytest.raises(ValueError, match="`values` must be \\[out_features"):
        check_nm(codes, values, 16)  # 9 slots over 2 windows


def test_check_nm_accepts_positions_falling_across_windows():
    """Positions ascend within a window, not across: window 1 may start below window 0's last."""
    w = torch.zeros(1, 16)
    w[0, [6, 7, 8, 9]] = 1.0
    codes, values = pack_nm(w, 2)
    assert check_nm(codes, values, 16) == 2
    assert slot_columns(codes, 2, 16).tolist() == [[6, 7, 8, 9]]


# ---------------------------------------------------------------------------------------------
# Argument errors (C++): each names the argument

def error_args():
    """out_features 4, in_features 32, n = 4: values [4, 16], codes [4, 2]."""
    g = torch.Generator().manual_seed(9)
    w, keep = nm_weight(4, 32, 4, g)
    codes, values = pack_nm(w, 4, keep)
    return dict(x=torch.ones(3, 32), codes=codes, values=values, in_features=32, bias=None)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(in_features=lambda a: 28), "`in_features` must be a multiple of 8"),
        (dict(in_features=lambda a: -8), "`in_features` must be a multiple of 8"),
        (dict(codes=lambda a: a["codes"].long()), "`codes` must have dtype"),
        (dict(codes=lambda a: a["codes"].flatten()), "`codes` must be 2-D"),
        (dict(codes=lambda a: a["codes"][:, :1].contiguous()), CODES_SHAPE),
        (dict(codes=lambda a: a["codes"][:3]), CODES_SHAPE),
        (dict(values=lambda a: torch.zeros(4, 36)), VALUES_SHAPE),  # n 9
        (dict(values=lambda a: torch.zeros(4, 14)), VALUES_SHAPE),
        (dict(values=lambda a: torch.zeros(4, 0)), VALUES_SHAPE),
        (dict(values=lambda a: a["values"].flatten()), "`values` must be 2-D"),
        (dict(values=lambda a: a["values"].double()), "`values` must have the same dtype as `x`"),
        (dict(values=lambda a: a["values"].t().contiguous().t()), "`codes` and `values` must be contiguous"),
        (dict(codes=lambda a: a["codes"].t().contiguous().t()), "`codes` and `values` must be contiguous"),
        (dict(x=lambda a: torch.ones(3, 24)), "`x` must have in_features = 32"),
        (dict(x=lambda a: torch.ones(())), "`x` must have in_features = 32"),
        (dict(x=lambda a: torch.ones(3, 32, dtype=torch.int64)), "`x` must be a floating point"),
        (dict(bias=lambda a: torch.ones(5)), "`bias` must have shape \\[4\\]"),
        (dict(bias=lambda a: torch.ones(1, 4)), "`bias` must have shape \\[4\\]"),
        (dict(bias=lambda a: torch.ones(4, dtype=torch.float64)), "`bias` must have the same dtype as `x`"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_argument_errors_name_the_argument(change, message):
    args = error_args()
    args.update({name: make(args) for name, make in change.items()})
    with pytest.raises(RuntimeError, match="nm_sparse_linear: " + message):
        OPS.nm_sparse_linear(*args.values())


# ---------------------------------------------------------------------------------------------
# Empty shapes and other edges

@pytest.mark.parametrize("m", [0, 1, 5, 20])
def test_empty_shapes(m):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 16, generator=g)
    # no output features
    codes, values = torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, 4)
    assert _ops.nm_sparse_linear(x, codes, values, 16, torch.zeros(0)).shape == (m, 0)
    assert _ops.nm_sparse_linear(x, codes, values, 16).shape == (m, 0)
    # no input features: the output is the bias (zeros without one)
    codes, values = pack_nm(torch.zeros(6, 0), 2)
    assert codes.shape == (6, 0) and values.shape == (6, 0)
    b = torch.randn(6, generator=g)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        xs, vs, bs = torch.randn(m, 0).to(dtype), values.to(dtype), b.to(dtype)
        assert torch.equal(_ops.nm_sparse_linear(xs, codes, vs, 0, bs), bs.expand(m, -1))
        assert torch.equal(_ops.nm_sparse_linear(xs, codes, vs, 0), torch.zeros(m, 6, dtype=dtype))
    # all values zero: the bias exactly, on every path
    for n in (1, 3, 4):
        codes, values = pack_nm(torch.zeros(6, 40), n)
        assert values.shape == (6, 5 * n) and not values.any()
        for dtype in (torch.float32, torch.float64):
            xs, vs, bs = torch.randn(m, 40, generator=g, dtype=dtype), values.to(dtype), b.to(dtype)
            assert torch.equal(_ops.nm_sparse_linear(xs, codes, vs, 40, bs), bs.expand(m, -1))
            assert torch.equal(_ops.nm_sparse_linear(xs, codes, vs, 40), torch.zeros(m, 6, dtype=dtype))


@pytest.mark.parametrize("n", SLOTS)
def test_single_window(n):
    """One window, one weight row, one row of x: every slot in the scalar tail (n < 8) or one
    chunk (n = 8); and 8 windows of n = 1 making one full chunk."""
    g = torch.Generator().manual_seed(n)
    for out, k in ((1, 8), (1, 64), (2, 8)):
        w, keep = torch.randn(out, k, generator=g), nm_mask(out, k, n, g, empty_row=out)
        for m in (1, 2, 16):
            x, b = torch.randn(m, k, generator=g), torch.randn(out, generator=g)
            assert_bounded(run(x, w, keep, n, b), x, w, keep, n, b, f"out={out} in={k} m={m}")
            assert_bounded(run(x, w, keep, n), x, w, keep, n, None, f"out={out} in={k} m={m}")


@pytest.mark.parametrize("create_graph", [False, True])
def test_empty_shapes_backward(create_graph):
    """No input features, nothing but zeros stored, an empty batch: x's gradient is zero (or
    empty), the bias's the column sums of the upstream gradient."""
    g = torch.Generator().manual_seed(1)
    for k, m in ((0, 1), (0, 20), (40, 0), (40, 3), (40, 20)):
        codes, values = pack_nm(torch.zeros(6, k), 2)
        for shape in ((m, k), (2, m, k)):
            x = torch.randn(shape, generator=g, requires_grad=True)
            v, b = values.clone().requires_grad_(), torch.randn(6, generator=g, requires_grad=True)
            y = _ops.nm_sparse_linear(x, codes, v, k, b)
            assert y.shape == (*shape[:-1], 6)
            grad = torch.randn(y.shape, generator=g)
            gx, gv, gb = torch.autograd.grad(y, (x, v, b), grad, create_graph=create_graph)
            assert torch.equal(gx, torch.zeros(shape)), (k, shape)
            assert gv.shape == values.shape
            if m == 0:
                assert torch.equal(gv, torch.zeros_like(gv)) and torch.equal(gb, torch.zeros_like(gb))
            else:
                flat = grad.double().reshape(-1, 6)
                assert_close_bounded(gb, flat.sum(0), flat.abs().sum(0), flat.shape[0], torch.float32, "grad_bias")


def test_backward_without_output_features():
    x = torch.randn(3, 16, requires_grad=True)
    v, b = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, requires_grad=True)
    y = _ops.nm_sparse_linear(x, torch.zeros(0, 1, dtype=torch.int32), v, 16, b)
    assert y.shape == (3, 0)
    gx, gv, gb = torch.autograd.grad(y, (x, v, b), torch.zeros(3, 0))
    assert torch.equal(gx, torch.zeros(3, 16)) and gv.shape == (0, 4) and gb.shape == (0,)


def test_pack_unpack_check_without_output_features():
    for n in (1, 2):
        codes, values = pack_nm(torch.zeros(0, 16), n)
        assert codes.shape == (0, 1) and values.shape == (0, 2 * n)
        assert check_nm(codes, values, 16) == n
        assert unpack_nm(codes, values, 16).shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# opcheck / fake tensors / torch.compile

def opcheck_samples():
    g = torch.Generator().manual_seed(11)
    for n, m in ((4, 3), (3, 20)):
        w, keep = nm_weight(9, 40, n, g)
        codes, values = pack_nm(w, n, keep)
        x = torch.randn(2, m, 40, generator=g, requires_grad=True)
        yield x, codes, values.requires_grad_(), 40, torch.randn(9, generator=g, requires_grad=True)
        yield x.detach(), codes, values.detach(), 40, None


@pytest.mark.usefixtures("one_thread")
def test_opcheck():
    for args in opcheck_samples():
        torch.library.opcheck(OPS.nm_sparse_linear, args)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = error_args()
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        y = OPS.nm_sparse_linear(fake["x"].reshape(1, 3, 32), fake["codes"], fake["values"], 32, None)
        assert y.shape == (1, 3, 4) and y.dtype == torch.float32
        with pytest.raises(RuntimeError, match="`in_features` must be a multiple of 8"):
            OPS.nm_sparse_linear(fake["x"], fake["codes"], fake["values"], 28, None)
        with pytest.raises(RuntimeError, match="`x` must have in_features = 32"):
            OPS.nm_sparse_linear(fake["x"][:, :24], fake["codes"], fake["values"], 32, None)


@pytest.mark.usefixtures("one_thread")
def test_compile_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(0)
    w, keep = nm_weight(32, 64, 2, g)
    codes, values = pack_nm(w, 2, keep)
    x = torch.randn(2, 3, 64, generator=g, requires_grad=True)
    v, b = values.clone().requires_grad_(), torch.randn(32, generator=g, requires_grad=True)

    def fn(x_, v_, b_):
        return _ops.nm_sparse_linear(x_, codes, v_, 64, b_).relu().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, v, b), fn(x, v, b))
    eager = torch.autograd.grad(fn(x, v, b), (x, v, b))
    traced = torch.autograd.grad(compiled(x, v, b), (x, v, b))
    for a, e in zip(traced, eager):
        assert torch.equal(a, e)
