"""The data pass behind data-driven importance: no side effects, works under no_grad/inference_mode;
the forms a `data` batch may take (tensors, tuples, dicts, tp.Inputs) and the ambiguous ones refused."""

import copy
import pickle
from collections import UserDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprune as tp

from conftest import assert_unchanged, snapshot


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]


def test_submodule_modes_and_statistics_survive():
    net = make_net()
    net[1].eval()  # a frozen BatchNorm inside a model in train mode
    stats = net[1].running_mean.clone()
    tp.prune(net, sparsity=0.5, importance="taylor", data=batches(), loss_fn=F.cross_entropy)
    assert [m.training for m in net.modules()] == [True, True, False, True, True]
    assert torch.equal(net[1].running_mean, stats)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(context):
    reference, net = make_net(), make_net()
    tp.prune(reference, sparsity=0.5, importance="gradient", data=batches(), loss_fn=F.cross_entropy)
    with context():
        data = batches()  # under inference_mode these are inference tensors
        tp.prune(net, sparsity=0.5, importance="gradient", data=data, loss_fn=F.cross_entropy)
    for name, mask in tp.masks(reference).items():
        assert torch.equal(tp.masks(net)[name], mask)


def test_layer_without_gradient_is_named_and_nothing_changes():
    net = make_net()
    net[0].weight.requires_grad_(False)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"layers \['0'\] received no gradient"):
        tp.prune(net, sparsity=0.5, importance="taylor", data=batches(), loss_fn=F.cross_entropy)
    assert_unchanged(net, before)


# --- the one parser of `data` batches and `example_inputs` ---------------------------------------


def test_as_inputs_and_call():
    from torchprune.calibration import as_inputs, call

    x = torch.ones(2, 3)
    assert as_inputs(x) == (x,) and as_inputs([x, 2]) == (x, 2) and as_inputs((x,), tensors_only=True) == (x,)
    with pytest.raises(ValueError, match="`example_inputs` must be given"):
        as_inputs(None)
    with pytest.raises(TypeError, match="`example_inputs` must be a tensor or a tuple"):
        as_inputs(3)
    with pytest.raises(TypeError, match="`example_inputs` must be a Tensor or a tuple/list of Tensors"):
        as_inputs([x, 2], tensors_only=True)
    assert torch.equal(call(torch.add, (x, x)), 2 * x) and torch.equal(call(torch.neg, x), -x)
    assert torch.equal(call(torch.add, tp.Inputs(x, other=x, alpha=2)), 3 * x)
    assert torch.equal(call(torch.add, {"input": x, "other": x}), 2 * x)
    assert torch.equal(call(torch.add, BatchEncoding(input=x, other=x)), 2 * x)


# --- the forms of a batch: tensors, tuples, dicts (model(**batch)) and tp.Inputs -----------------


class BatchEncoding(UserDict):
    """Like Hugging Face's BatchEncoding: a UserDict (a Mapping, not a dict) with attribute access."""

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


class TwoInputs(nn.Module):
    """A forward that takes (input_ids, attention_mask=None), as a Hugging Face model does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        hidden = torch.relu(self.embed(input_ids))
        return self.head(hidden if attention_mask is None else hidden * attention_mask)


class KeywordsOnly(TwoInputs):
    def forward(self, **batch):
        return super().forward(batch["input_ids"], batch.get("attention_mask"))


def text_batches():
    """(input_ids, attention_mask, targets) triples; the mask zeroes some samples' hidden state."""
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 6, generator=g), (torch.rand(4, 1, generator=g) > 0.3).float(),
             torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]


FORWARD_FORMS = {  # each yields the same inputs, model(ids, attention_mask=mask), with or without targets
    "dict": lambda ids, mask, y: {"input_ids": ids, "attention_mask": mask},
    "BatchEncoding": lambda ids, mask, y: BatchEncoding(input_ids=ids, attention_mask=mask),
    "Inputs positional": lambda ids, mask, y: tp.Inputs(ids, mask),
    "(dict, targets)": lambda ids, mask, y: ({"input_ids": ids, "attention_mask": mask}, y),
    "(Inputs, targets)": lambda ids, mask, y: (tp.Inputs(ids, attention_mask=mask), y),
    "((ids, mask), targets)": lambda ids, mask, y: ((ids, mask), y),
    "[(ids, mask), None]": lambda ids, mask, y: [(ids, mask), None],
}
BACKWARD_FORMS = {name: form for name, form in FORWARD_FORMS.items() if name.startswith("(")}
BACKWARD_FORMS["(BatchEncoding, targets)"] = lambda ids, mask, y: (BatchEncoding(input_ids=ids, attention_mask=mask), y)


def masks_on(model, importance, data, **kwargs):
    tp.prune(model, sparsity=0.5, importance=importance, data=data, **kwargs)
    return tp.masks(model)


def assert_same_masks(got, expected):
    assert got.keys() == expected.keys()
    for name, mask in expected.items():
        assert torch.equal(got[name], mask), name


@pytest.mark.parametrize("importance", ["wanda", "activation"])
@pytest.mark.parametrize("form", FORWARD_FORMS)
def test_forward_forms_give_the_masks_of_the_explicit_form(importance, form):
    explicit = masks_on(TwoInputs(), importance, [tp.Inputs(ids, attention_mask=m) for ids, m, _ in text_batches()])
    if importance == "wanda":  # the attention mask reaches the forward: without it the masks differ
        without_mask = masks_on(TwoInputs(), importance, [ids for ids, _, _ in text_batches()])
        assert any(not torch.equal(without_mask[n], m) for n, m in explicit.items())
    got = masks_on(TwoInputs(), importance, [FORWARD_FORMS[form](*b) for b in text_batches()])
    assert_same_masks(got, explicit)


@pytest.mark.parametrize("importance", ["wanda", "activation"])
def test_keyword_only_forward_takes_dicts_and_keyword_inputs(importance):
    explicit = masks_on(TwoInputs(), importance, [tp.Inputs(ids, attention_mask=m) for ids, m, _ in text_batches()])
    for form in (lambda ids, mask: {"input_ids": ids, "attention_mask": mask},
                 lambda ids, mask: BatchEncoding(input_ids=ids, attention_mask=mask),
                 lambda ids, mask: tp.Inputs(input_ids=ids, attention_mask=mask)):
        assert_same_masks(masks_on(KeywordsOnly(), importance, [form(ids, m) for ids, m, _ in text_batches()]),
                          explicit)


@pytest.mark.parametrize("importance", ["taylor", "gradient"])
@pytest.mark.parametrize("form", BACKWARD_FORMS)
def test_backward_forms_give_the_masks_of_the_explicit_form(importance, form):
    explicit = [(tp.Inputs(ids, attention_mask=m), y) for ids, m, y in text_batches()]
    explicit = masks_on(TwoInputs(), importance, explicit, loss_fn=F.cross_entropy)
    got = masks_on(TwoInputs(), importance, [BACKWARD_FORMS[form](*b) for b in text_batches()], loss_fn=F.cross_entropy)
    assert_same_masks(got, explicit)


INPUTS_WITH_TARGETS = {
    "dict": lambda ids, mask, y: ({"input_ids": ids, "attention_mask": mask}, y),
    "Inputs": lambda ids, mask, y: (tp.Inputs(ids, attention_mask=mask), y),
    "BatchEncoding": lambda ids, mask, y: (BatchEncoding(input_ids=ids, attention_mask=mask), y),
}


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("importance", ["taylor", "wanda"])
@pytest.mark.parametrize("form", INPUTS_WITH_TARGETS)
def test_tensors_inside_dicts_and_inputs_made_under_inference_mode(context, importance, form):
    loss = dict(loss_fn=F.cross_entropy) if importance == "taylor" else {}
    reference = masks_on(TwoInputs(), importance, [INPUTS_WITH_TARGETS[form](*b) for b in text_batches()], **loss)
    model = TwoInputs()
    with context():
        data = [INPUTS_WITH_TARGETS[form](*b) for b in text_batches()]  # inference tensors under inference_mode
        assert_same_masks(masks_on(model, importance, data, **loss), reference)


def test_channel_scores_read_dicts_and_inputs():
    ids, mask, _ = text_batches()[0]
    masks = []
    for data in ([{"input_ids": ids, "attention_mask": mask}], [tp.Inputs(ids, attention_mask=mask)]):
        model = TwoInputs()
        tp.prune(model, sparsity=0.5, granularity="channel", importance="activation", example_inputs=(ids, mask),
                 data=data)
        masks.append(model.embed.weight.clone())
    assert masks[0].shape[0] == 4 and torch.equal(masks[0], masks[1])


class StarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, *inputs):
        return self.fc(sum(inputs))


def test_a_pair_of_tensors_is_read_by_the_forward_signature():
    from torchprune.calibration import batches

    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert list(batches([(x, y), [x, y]])) == [(x, y), (x, y)]  # backward passes: always (inputs, targets)
    for one_input in (None, nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2)), torch.compile(nn.Linear(3, 2))):
        assert list(batches([(x, y)], targets=False, model=one_input)) == [(x, y)]
    for model in (TwoInputs(), StarArgs()):
        for unambiguous in (((x,), y), (tp.Inputs(x), y), ({"input_ids": x}, y), (x, None), (x, [0, 1])):
            assert list(batches([unambiguous], targets=False, model=model)) == [unambiguous]
        with pytest.raises(TypeError) as error:
            list(batches([(x, y)], targets=False, model=model))
        message = str(error.value)
        assert message.startswith("`data` yielded a pair of tensors") and "ambiguous" in message
        assert all(form in message for form in ("tp.Inputs(a, b)", "dict", "((x,), y)", "(tp.Inputs(x), y)"))


def test_ambiguous_pair_raises_before_anything_changes():
    model, (ids, mask, _) = TwoInputs(), text_batches()[0]
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"`data` yielded a pair of tensors and TwoInputs.forward may take both"):
        tp.prune(model, sparsity=0.5, importance="wanda", data=[(ids, mask)])
    assert_unchanged(model, before)


def test_bare_inputs_and_other_forms():
    from torchprune.calibration import batches

    x, y = torch.zeros(2, 3), torch.zeros(2)
    bare = [x, {"input_ids": x}, BatchEncoding(input_ids=x), tp.Inputs(x, mask=y)]
    assert list(batches(bare, targets=False)) == [(b, None) for b in bare]
    for batch in bare:
        with pytest.raises(TypeError, match=r"^`data` must yield \(inputs, targets\) pairs, inputs being a tensor, "
                                            r"a tuple/list of positional inputs, a dict of keyword inputs or a "
                                            r"tp.Inputs; got .* \(several inputs: \(tp.Inputs\(a, b\), targets\)\)"):
            list(batches([batch]))
    with pytest.raises(TypeError, match=r"^`data` must yield inputs or \(inputs, targets\) pairs, .*got tuple of "
                                        r"\(Tensor, Tensor, Tensor\) \(several inputs: tp.Inputs\(a, b\)\)"):
        list(batches([(x, x, y)], targets=False))
    with pytest.raises(TypeError, match="`data` must yield inputs or .* got tuple of \\(Tensor\\)"):
        list(batches([(x,)], targets=False))
    for targets in (True, False):
        with pytest.raises(TypeError, match=r"^`data` must yield inputs that are a tensor, .* got str "
                                            r"\(any other object: tp.Inputs\(obj\)\)"):
            list(batches([("text", y)], targets=targets))


def test_inputs_is_an_immutable_record_that_pickles():
    x = torch.arange(3.0)
    inputs = tp.Inputs(x, 2, mask=x)
    assert inputs.args == (x, 2) and dict(inputs.kwargs) == {"mask": x}
    assert repr(tp.Inputs(1, mask=None)) == "Inputs(1, mask=None)"
    with pytest.raises(AttributeError, match="immutable"):
        inputs.args = ()
    with pytest.raises(AttributeError, match="immutable"):
        del inputs.kwargs
    with pytest.raises(TypeError):
        inputs.kwargs["mask"] = None
    for copied in (pickle.loads(pickle.dumps(inputs)), copy.deepcopy(inputs)):
        assert isinstance(copied, tp.Inputs) and torch.equal(copied.args[0], x) and copied.args[1] == 2
        assert torch.equal(copied.kwargs["mask"], x) and copied.args[0] is not x
    assert "Inputs" in tp.__all__ and tp.Inputs is tp.calibration.Inputs
