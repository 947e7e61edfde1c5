"""granularity="channel" on hand-written (timm-style) attention: the head size shrinks
(head_dims.py). Every head keeps floor((1 - sparsity) * head_dim) (then round_to) of its q/k
positions (the same ones for q and k) and as many v positions (with proj's columns); head_dim,
attn_dim and scale are rewritten and q rescaled so that both the fused
(F.scaled_dot_product_attention) and the explicit (q * self.scale) paths give the scores of
zeroing those positions. A module whose removal does not match zeroing stays whole, with a warning.
The step is recorded and replayed by tp.save / tp.load."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp
from torchprune.structured.channels import warn_unprunable
from torchprune.structured.graph import DependencyGraph
from torchprune.structured.head_dims import apply_head_dims, shrink_head_dims, zero_head_dims
from torchprune.structured.plan import steps_of

from error_bounds import assert_same_function
from zoo import randomize_norms

DIM, HEADS, HEAD_DIM, HIDDEN = 16, 2, 8, 32
ATTENTIONS = ("blocks.0.attn", "blocks.1.attn")
#: Frozen so that only the head size changes: fc1 is a member of the residual width's group (its
#: inputs) and of the MLP hidden width's (its outputs), so both stay whole; the output then equals a
#: copy with the removed head positions zeroed (LayerNorm over a pruned residual would not).
KEEP_WIDTHS = ["blocks.0.fc1", "blocks.1.fc1"]


class Attention(nn.Module):
    """timm's vision_transformer.Attention in small: a fused qkv reshaped with num_heads and
    head_dim, the fused or the explicit path, the heads joined with attn_dim, proj."""

    def __init__(self, dim=DIM, heads=HEADS, head_dim=HEAD_DIM, fused_attn=True, qk_norm=False):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.attn_dim = heads * head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            q = q * self.scale
            attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(x)


class QKNorm(Attention):
    """timm's qk_norm=True: LayerNorms over the head size, which removal cannot follow."""

    def __init__(self, **kwargs):
        super().__init__(qk_norm=True, **kwargs)


class LiteralHeadSize(Attention):
    """A forward with a literal head size and a literal scale: nothing it reads can shrink."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class ConstantScale(Attention):
    """Shapes from num_heads / head_dim but hard-codes its scale (not self.scale, not head_dim)."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        scale = 0.125
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim))


class Block(nn.Module):
    """Pre-norm residual block: attention, then a GELU MLP."""

    def __init__(self, attn):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM), attn
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(DIM), nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Linear token embedding, two blocks (their attention classes ``kinds``), norm, head; float64."""

    def __init__(self, kinds=(Attention, Attention), seed=0, **kwargs):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(5, DIM)
        self.blocks = nn.Sequential(*(Block(kind(**kwargs)) for kind in kinds))
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 3)
        randomize_norms(self, seed)
        self.double().eval()

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))))


def tokens(seed=0):
    return torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def head_steps(model):
    """{module name: its "head_dims" step}."""
    return {s["module"]: s for s in steps_of(model) if s["kind"] == "head_dims"}


def zeroed(model, steps):
    """A copy of ``model`` with the positions ``steps`` remove zeroed instead."""
    reference = copy.deepcopy(model)
    for name, step in steps.items():
        zero_head_dims(reference.get_submodule(name), step["qk"], step["v"])
    return reference


def user_warnings(run):
    """The UserWarning messages ``run()`` gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def rows(kept, offset=0):
    """qkv row (or proj column) indices of per-head positions ``kept``."""
    return [offset + h * HEAD_DIM + j for h, js in enumerate(kept) for j in js]


@pytest.mark.parametrize("fused", [True, False])
def test_prune_halves_the_head_size_and_keeps_the_function(fused):
    model, x = TinyViT(fused_attn=fused), tokens()
    original = copy.deepcopy(model)
    assert user_warnings(lambda: tp.prune(model, 0.5, granularity="channel", example_inputs=x,
                                          freeze=KEEP_WIDTHS)) == []  # nothing kept, nothing to warn about
    steps = head_steps(model)
    assert sorted(steps) == list(ATTENTIONS)
    for name in ATTENTIONS:
        attn, old, step = model.get_submodule(name), original.get_submodule(name), steps[name]
        assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (2, 4, 8)
        assert attn.scale == 4 ** -0.5 and step["scale"] == 4 ** -0.5
        assert attn.qkv.weight.shape == (24, DIM) and attn.qkv.bias.shape == (24,) and attn.qkv.out_features == 24
        assert attn.proj.weight.shape == (DIM, 8) and attn.proj.in_features == 8
        qk, v = step["qk"], step["v"]
        assert len(qk) == len(v) == HEADS and all(len(js) == 4 == len(set(js)) and js == sorted(js) for js in qk + v)
        # q rows rescaled by sqrt(4 / 8), k and v rows and proj's columns as they were
        q_rows, k_rows, v_rows = rows(qk), rows(qk, 16), rows(v, 32)
        factor = math.sqrt(0.5)
        torch.testing.assert_close(attn.qkv.weight[:8], old.qkv.weight[q_rows] * factor, rtol=1e-15, atol=0)
        torch.testing.assert_close(attn.qkv.bias[:8], old.qkv.bias[q_rows] * factor, rtol=1e-15, atol=0)
        assert torch.equal(attn.qkv.weight[8:], old.qkv.weight[k_rows + v_rows])
        assert torch.equal(attn.proj.weight, old.proj.weight[:, rows(v)])
    reference = zeroed(original, steps)
    for inputs in (x, tokens(1)):  # the example inputs and others
        assert_same_function(model, reference, inputs)
    assert (model(x) - original(x)).abs().max() > 1e-3  # something did go


@pytest.mark.parametrize("fused", [True, False])
def test_apply_head_dims_rescaled_equals_zeroing_on_one_module(fused):
    torch.manual_seed(0)
    attn, x = Attention(fused_attn=fused).double().eval(), torch.randn(2, 6, DIM, dtype=torch.float64)
    qk, v = [[1, 4, 6, 7], [0, 2, 3, 5]], [[0, 1, 2, 3], [4, 5, 6, 7]]
    reference, rescaled, plain = copy.deepcopy(attn), copy.deepcopy(attn), copy.deepcopy(attn)
    zero_head_dims(reference, qk, v)
    assert torch.count_nonzero(reference.qkv.weight.abs().sum(1)) == 3 * HEADS * 4
    apply_head_dims(rescaled, qk, v, 4 ** -0.5)
    assert (rescaled.head_dim, rescaled.attn_dim, rescaled.scale) == (4, 8, 0.5)
    assert_same_function(rescaled, reference, x)
    apply_head_dims(plain, qk, v, None)  # q as it was, scale left at 8 ** -0.5
    assert (plain.head_dim, plain.attn_dim, plain.scale) == (4, 8, 8 ** -0.5)
    gap = (plain(x) - reference(x)).abs().max()
    if fused:  # F.scaled_dot_product_attention's implicit scale reads the new q.size(-1)
        assert gap > 1e-4
    else:  # q * self.scale with the old scale: the old scores
        assert gap < 1e-12


def test_the_highest_scoring_positions_are_kept():
    model, x = TinyViT(), tokens()
    # per block and head: q rows big at qa, k rows at kb (so q/k keep qa | kb), v rows big at va,
    # proj columns at pb (v keeps va | pb); with tp.prune's "magnitude" (p = 1) the others score ~10x lower
    chosen = {"blocks.0.attn": ([[1, 6], [0, 3]], [[4, 7], [2, 5]], [[0, 1], [4, 5]], [[2, 3], [6, 7]]),
              "blocks.1.attn": ([[0, 2], [1, 7]], [[3, 5], [4, 6]], [[6, 7], [0, 2]], [[4, 5], [1, 3]])}
    with torch.no_grad():
        for name, (qa, kb, va, pb) in chosen.items():
            attn = model.get_submodule(name)
            attn.qkv.weight[rows(qa)] *= 10
            attn.qkv.weight[rows(kb, 16)] *= 10
            attn.qkv.weight[rows(va, 32)] *= 10
            attn.proj.weight[:, rows(pb)] *= 10
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)
    steps = head_steps(model)
    for name, (qa, kb, va, pb) in chosen.items():
        assert steps[name]["qk"] == [sorted(a + b) for a, b in zip(qa, kb)]
        assert steps[name]["v"] == [sorted(a + b) for a, b in zip(va, pb)]
        assert model.get_submodule(name).head_dim == 4


@pytest.mark.parametrize("sparsity, round_to, head_dim", [
    (0.3, 4, 4),  # floor(0.7 * 8) = 5, to the nearest multiple of 4: 4
    (0.5, 3, 3),  # 4 -> 3 * floor(4 / 3 + 0.5) = 3
    (0.3, 1, 5),  # 5
    (0.2, 4, 8),  # floor(6.4) = 6 -> 4 * floor(1.5 + 0.5) = 8: the full size, nothing goes
    (0.5, 16, 8),  # round_to above the head size: kept whole
])
def test_round_to_rounds_the_kept_head_size(sparsity, round_to, head_dim):
    model, x = TinyViT(), tokens()
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a head kept whole is named among the kept layers
        tp.prune(model, sparsity, granularity="channel", example_inputs=x, round_to=round_to, freeze=KEEP_WIDTHS)
    steps = head_steps(model)
    for name in ATTENTIONS:
        attn = model.get_submodule(name)
        assert (attn.head_dim, attn.attn_dim, attn.qkv.out_features) == (head_dim, 2 * head_dim, 6 * head_dim)
        assert attn.scale == head_dim ** -0.5
    assert sorted(steps) == ([] if head_dim == HEAD_DIM else list(ATTENTIONS))
    assert all(len(js) == head_dim for s in steps.values() for js in s["qk"] + s["v"])
    assert_same_function(model, zeroed(original, steps), x)


def test_shrink_head_dims_returns_what_it_changed():
    model, x = TinyViT(), tokens()
    assert shrink_head_dims(model, x, 0.0, 2.0) == [] and head_steps(model) == {}
    assert model.blocks[0].attn.head_dim == HEAD_DIM
    assert shrink_head_dims(model, x, 0.75, 2.0) == list(ATTENTIONS)
    assert [model.get_submodule(n).head_dim for n in ATTENTIONS] == [2, 2]


@pytest.mark.parametrize("kind", [QKNorm, LiteralHeadSize])
def test_a_module_that_cannot_shrink_stays_whole_with_a_warning(kind):
    model, x = TinyViT(kinds=(Attention, kind)), tokens()
    original = copy.deepcopy(model)
    messages = user_warnings(lambda: tp.prune(model, 0.5, granularity="channel", example_inputs=x,
                                              freeze=KEEP_WIDTHS))
    assert any(m.startswith("kept the head size of attention modules ['blocks.1.attn']:") for m in messages)
    kept, old = model.blocks[1].attn, original.blocks[1].attn
    assert (kept.head_dim, kept.attn_dim, kept.scale) == (HEAD_DIM, 16, HEAD_DIM ** -0.5)
    state, before = kept.state_dict(), old.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    assert sorted(head_steps(model)) == ["blocks.0.attn"] and model.blocks[0].attn.head_dim == 4
    assert_same_function(model, zeroed(original, head_steps(model)), x)


def test_a_hard_coded_scale_falls_back_to_the_plain_removal():
    model, x = TinyViT(kinds=(Attention, ConstantScale)), tokens()
    original = copy.deepcopy(model)
    assert user_warnings(lambda: tp.prune(model, 0.5, granularity="channel", example_inputs=x,
                                          freeze=KEEP_WIDTHS)) == []
    steps = head_steps(model)
    assert steps["blocks.0.attn"]["scale"] == 0.5 and steps["blocks.1.attn"]["scale"] is None
    attn, old = model.blocks[1].attn, original.blocks[1].attn
    assert (attn.head_dim, attn.attn_dim, attn.scale) == (4, 8, HEAD_DIM ** -0.5)  # scale untouched
    assert torch.equal(attn.qkv.weight, old.qkv.weight[rows(steps["blocks.1.attn"]["qk"])
                                                       + rows(steps["blocks.1.attn"]["qk"], 16)
                                                       + rows(steps["blocks.1.attn"]["v"], 32)])  # q not rescaled
    assert_same_function(model, zeroed(original, steps), x)
    # why: the rescaled removal changes this module's scores (0.125 does not follow head_dim)
    rescaled, reference = copy.deepcopy(old), zeroed(original, steps).blocks[1].attn
    apply_head_dims(rescaled, steps["blocks.1.attn"]["qk"], steps["blocks.1.attn"]["v"], 0.5)
    h = torch.randn(2, 6, DIM, dtype=torch.float64)
    assert (rescaled(h) - reference(h)).abs().max() > 1e-4


def test_a_hard_coded_scale_with_small_logits_keeps_the_function():
    """The check's bound follows the dtype: in float64 a rescaling that moves the output by 1e-4 is
    refused, and the plain removal (exact here) is kept."""
    model, x = TinyViT(kinds=(ConstantScale, ConstantScale)), tokens()
    with torch.no_grad():
        for name in ATTENTIONS:  # nearly uniform attention: q rescaling moves the output by < 1e-4
            model.get_submodule(name).qkv.weight[:32] *= 0.01
    original = copy.deepcopy(model)
    tp.prune(model, 0.5, granularity="channel", example_inputs=x, freeze=KEEP_WIDTHS)
    assert_same_function(model, zeroed(original, head_steps(model)), x)


@pytest.mark.parametrize("exclude, freeze, head_dim", [
    (["blocks.0.attn"], [], HEAD_DIM),  # the module: its heads' members are its own outputs
    (lambda m: [m.blocks[0].attn], [], HEAD_DIM),  # the same, by module
    ([Attention], [], None),  # by type: every attention module, with its subtree
    (["blocks.0.attn.qkv"], [], HEAD_DIM),  # q/k/v rows are qkv's outputs
    (["blocks.0.attn.proj"], [], 4),  # proj keeps its outputs (the width); its columns may go
    ([], ["blocks.0.attn.proj"], HEAD_DIM),  # frozen: nothing of it changes
    ([], ["blocks.0.attn.qkv"], HEAD_DIM),
])
def test_exclude_and_freeze_keep_the_head_size(exclude, freeze, head_dim):
    model, x = TinyViT(), tokens()
    exclude = exclude(model) if callable(exclude) else exclude
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.prune(model, 0.5, granularity="channel", example_inputs=x, exclude=exclude, freeze=freeze)
    attn0, attn1 = model.blocks[0].attn, model.blocks[1].attn
    if head_dim is None:  # every attention module excluded
        assert (attn0.head_dim, attn1.head_dim) == (HEAD_DIM, HEAD_DIM) and head_steps(model) == {}
        return
    assert attn0.head_dim == head_dim and attn0.qkv.out_features == 6 * head_dim
    assert attn1.head_dim == 4  # the other module is not excluded
    assert ("blocks.0.attn" in head_steps(model)) == (head_dim != HEAD_DIM)
    if exclude == ["blocks.0.attn.proj"] or freeze:
        assert attn0.proj.out_features == DIM  # the residual width stays with proj's outputs


@pytest.mark.parametrize("kind", [Attention, ConstantScale])
def test_save_and_load_replay_the_head_size(tmp_path, kind):
    model, x = TinyViT(kinds=(kind, kind)), tokens()
    tp.prune(model, 0.5, granularity="channel", example_inputs=x)  # channels and head sizes
    assert [s["kind"] for s in steps_of(model)] == ["channels", "head_dims", "head_dims"]
    tp.save(model, tmp_path / "pruned.pt")
    fresh = tp.load(tmp_path / "pruned.pt", TinyViT(kinds=(kind, kind), seed=1))
    for name in ATTENTIONS:
        a, b = fresh.get_submodule(name), model.get_submodule(name)
        assert (a.head_dim, a.attn_dim, a.scale) == (b.head_dim, b.attn_dim, b.scale)
        assert a.head_dim == 4 and a.scale == (0.5 if kind is Attention else HEAD_DIM ** -0.5)
    assert steps_of(fresh) == steps_of(model)
    assert_same_function(fresh, model, tokens(1))


def _corrupt(step):
    """Ways to break a "head_dims" step (each returns the broken step)."""
    def change(**values):
        return dict(copy.deepcopy(step), **values)

    qk, v = step["qk"], step["v"]
    return {
        "one head too few": change(qk=qk[:1], v=v[:1]),
        "a head too many": change(qk=qk + qk[:1], v=v + v[:1]),
        "position past head_dim": change(qk=[[HEAD_DIM] + qk[0][1:], qk[1]]),
        "negative position": change(v=[v[0], [-1] + v[1][1:]]),
        "float position": change(qk=[[float(j) for j in qk[0]], qk[1]]),
        "q/k and v lengths differ": change(v=[js[:-1] for js in v]),
        "ragged heads": change(qk=[qk[0], qk[1][:-1]]),
        "int scale": change(scale=1),
        "str scale": change(scale="0.5"),
        "absent module": change(module="blocks.7.attn"),
        "not attention": change(module="blocks.0.fc1"),
    }


@pytest.fixture(scope="module")
def saved_payload(tmp_path_factory):
    """The file of a TinyViT whose head sizes were halved (nothing else), as torch.load reads it."""
    model = TinyViT()
    tp.prune(model, 0.5, granularity="channel", example_inputs=tokens(), freeze=KEEP_WIDTHS)
    path = tmp_path_factory.mktemp("head_dims") / "pruned.pt"
    tp.save(model, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("broken", list(_corrupt({"qk": [[0, 1, 2, 3]] * 2, "v": [[0, 1, 2, 3]] * 2})))
def test_load_rejects_a_corrupted_head_dims_step(tmp_path, saved_payload, broken):
    payload = copy.deepcopy(saved_payload)
    index = next(i for i, s in enumerate(payload["structure"]) if s["kind"] == "head_dims")
    payload["structure"][index] = _corrupt(payload["structure"][index])[broken]
    torch.save(payload, tmp_path / "broken.pt")
    fresh = TinyViT()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=rf"does not match the file: structural step {index} shrinks the heads"):
        tp.load(tmp_path / "broken.pt", fresh)
    assert fresh.blocks[0].attn.head_dim == HEAD_DIM and steps_of(fresh) == []  # unchanged
    assert all(torch.equal(t, before[k]) for k, t in fresh.state_dict().items())


def test_the_uncorrupted_payload_loads(tmp_path, saved_payload):
    """The control for the test above: the same payload, rewritten unchanged, loads."""
    torch.save(saved_payload, tmp_path / "same.pt")
    fresh = tp.load(tmp_path / "same.pt", TinyViT(seed=1))
    assert [fresh.get_submodule(n).head_dim for n in ATTENTIONS] == [4, 4]


def test_kept_layers_warning_does_not_name_shrunk_modules():
    model, x = TinyViT(kinds=(Attention, LiteralHeadSize)), tokens()
    messages = user_warnings(lambda: tp.prune(model, 0.5, granularity="channel", example_inputs=x))
    kept = [m for m in messages if "left some channels" in m]
    assert len(kept) == 1 and "blocks.1.attn.qkv" in kept[0]  # the module left whole is named
    assert "blocks.0.attn" not in kept[0]  # the shrunk one is not
    # warn_unprunable names a hand-written attention's qkv unless it is handled
    graph = DependencyGraph(TinyViT(), x)
    with pytest.warns(UserWarning, match=r"kept blocks\.0\.attn\.qkv"):
        warn_unprunable(graph)
    assert not any("attn" in m for m in user_warnings(lambda: warn_unprunable(graph, handled=list(ATTENTIONS))))


def test_an_attention_model_shrunk_at_the_root_is_not_named_kept():
    torch.manual_seed(0)
    attn, x = Attention().double().eval(), torch.randn(2, 6, DIM, dtype=torch.float64)
    messages = user_warnings(lambda: tp.prune(attn, 0.5, granularity="channel", example_inputs=x))
    assert attn.head_dim == 4 and sorted(head_steps(attn)) == [""]
    assert not any("kept qkv" in m for m in messages)
