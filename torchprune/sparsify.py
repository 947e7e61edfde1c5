"""sparsify(): swap pruned layers for the sparse modules where the sparse kernel is faster.

A sparse kernel is not faster at every sparsity: a CSR product does less arithmetic per stored
weight than a dense GEMM, so below a break-even sparsity (which depends on the batch and the
layer) the dense layer wins. sparsify() therefore decides per layer, in this order:

1. ``min_sparsity`` given: every eligible layer at or above it is swapped (nothing is timed).
2. ``example_inputs`` given: one forward records each layer's real input shapes (forward hooks)
   and the layers read from outside (below), then the layer as it is (dense or masked) and its
   sparse module are timed on those shapes, interleaved, medians of several calls
   (``torchprune.timing``); the faster one is kept. Timing uses the current
   ``torch.get_num_threads()``; a layer called with several shapes sums its calls.
3. Neither: the cost model :data:`BREAK_EVEN`: per layer kind (linear, block-sparse linear, N:8
   linear, 1x1 conv, other conv) and
   batch, the lowest sparsity from which the sparse kernel beat the dense one in every measured
   shape (the ``break_even`` entry that ``benchmarks/bench_linear.py`` and ``bench_conv.py``
   print and save). The batch is not known without inputs, so the largest break-even over the
   measured batches applies: a swapped layer was faster at every batch measured. A kind that
   never beat dense (None) is never swapped by the cost model.

Eligible layers: ``nn.Linear`` and ``nn.Conv2d`` (exact types, masked or not) on the CPU in fp32,
fp64 or bf16, with groups=1, with some sparsity (a mask, or zero weights), and whose weight no
other module uses. Grouped and depthwise convolutions stay dense: there is no sparse kernel for
them. The sparse model computes the same outputs as the original (to float rounding).

Layers read from outside their forward stay dense. Some parents read a child layer's attributes
in their own forward instead of only calling it: transformers' ``T5DenseActDense`` compares its
input's dtype with ``wo.weight.dtype``, timm's edgenext and xcit take ``token_projection.weight``'s
device and dtype. A sparse module has no ``weight``, so such a layer must not be swapped. With
``example_inputs`` (also alongside ``min_sparsity``) the one forward finds them: for that forward
only, each eligible layer's class is a recording subclass that notes reads of its ``weight``,
``bias`` and every other attribute its sparse module lacks (``weight_mask``, a conv's ``groups``)
made by code other than the layer's own call (the sparse module has a ``bias``, but code that reads
a layer's parameters treats it as a dense layer, and may reach its weight on other inputs); such a
layer stays dense, with the reason "its weight is read outside its forward (by
T5DenseActDense.forward); kept dense". The classes are put back
after the forward, even when it fails. Only the reads on the path the example takes (eval mode, no
grad) are seen; reads at construction or in methods the forward does not call do not matter.
Without ``example_inputs`` nothing runs, so only the known case is kept dense (the ``linear1`` /
``linear2`` of ``nn.TransformerEncoderLayer``, whose inference fast path reads their weights);
another parent that reads a swapped layer's weight gets an AttributeError that says to pass
``example_inputs``.

A swapped layer is a new module: hooks registered on the original layer are not carried over, and
it has no ``weight`` attribute (``dense_weight()`` gives the dense weight). Register hooks after
sparsify().
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .calibration import as_inputs
from .masking import base_type, get_mask, is_prunable
from .nn.sparse import SPARSE_DTYPES, SparseConv2d, SparseLinear, block_pattern, nm_pattern
from .ops.devices import kernel_devices
from .state import hooked_eval
from .timing import medians, sample_interleaved, warm_up

__all__ = ["sparsify", "plan", "Decision", "BREAK_EVEN"]

#: Break-even sparsity by layer kind and batch (None: the sparse kernel never beat dense there).
#: Source: the benchmarks/bench_linear.py and bench_conv.py grids (sparsity 0.5-0.98; linear
#: 768x768, 3072x768, 768x3072, 4096x4096 at batch 1/8/64/256; 3x3 and 1x1 convs at ResNet stage
#: shapes at batch 1/8), fp32, 2 threads, against F.linear / F.conv2d, 15 interleaved repeats,
#: run 2026-11-23 20:11-20:43 UTC on the 2-core AMD EPYC VM with nothing else running: the lowest
#: sparsity from which torchprune was faster in every shape. Rerun the benchmarks (they print and
#: save these break-evens) and update the table when the kernels change.
#: "linear_block": Linears whose mask is whole R x 1 blocks (stored "bsr"), from
#: ``bench_linear.py --block 4`` (7 transformer shapes 384x384..4096x4096, M = 1/128/512, sparsity
#: 0.5-0.9, 3 s a case) run 2026-12-02 on the 2-core AMD EPYC family 25 model 1 (Zen 3), quiet.
#: "linear_nm": Linears whose mask is 2:4 or 4:8 (stored "nm 4:8"), from ``bench_linear.py --nm 2:4``
#: (the "linear" row's four shapes 768x768, 3072x768, 768x3072, 4096x4096; 2 s a case) run
#: 2026-12-03 on the same machine, quiet: faster than F.linear on all four at 1-8 rows, slower on
#: all at 128, so without example_inputs (batch unknown) the cost model keeps them dense.
BREAK_EVEN: Dict[str, Dict[int, Optional[float]]] = {
    "linear": {1: 0.7, 8: 0.5, 64: 0.7, 256: 0.7},
    "linear_block": {1: 0.7, 128: 0.5, 512: 0.5},
    "linear_nm": {1: 0.5, 4: 0.5, 8: 0.5, 128: None},
    "conv1x1": {1: 0.8, 8: 0.7},
    "conv": {1: 0.95, 8: 0.9},
}


@dataclass
class Decision:
    """What sparsify() decided for one layer, and why."""

    name: str
    sparsity: float
    swap: bool
    reason: str


def sparsify(model: nn.Module, min_sparsity: Optional[float] = None,
             example_inputs: Optional[Union[Tensor, Sequence[Tensor]]] = None,
             inplace: bool = False) -> nn.Module:
    """Returns ``model`` with its pruned Linear/Conv2d layers swapped for ``tp.nn`` sparse layers.

    Only layers where the sparse kernel is faster are swapped (see the module docstring); the
    rest stay as they are. ``model`` itself is left unchanged unless ``inplace=True``.

    >>> tp.prune(model, sparsity=0.9)
    >>> fast = tp.sparsify(model, example_inputs=x[:1])   # times each layer at batch 1
    >>> torch.testing.assert_close(fast(x), model(x))
    """
    if not isinstance(inplace, bool):
        raise TypeError(f"`inplace` must be a bool, got {type(inplace).__name__}")
    decisions = plan(model, min_sparsity, example_inputs)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules(remove_duplicate=False))
    sparse: Dict[int, nn.Module] = {}
    for decision in decisions.values():
        if decision.swap:
            layer = modules[decision.name]
            sparse[id(layer)] = SPARSE_CLASS[base_type(layer)].from_dense(layer)
    for parent in list(modules.values()):  # every name a swapped layer is registered under
        for child_name, child in list(parent._modules.items()):  # named_children() drops aliases
            if id(child) in sparse:
                setattr(parent, child_name, sparse[id(child)])
    return sparse.get(id(target), target)  # the model may itself be one layer


SPARSE_CLASS = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}
# Parents known to read their Linear children's .weight in their own forward: kept dense also
# without example_inputs (with them, the traced forward finds any parent that does, see _OutsideReads).
_READS_CHILD_WEIGHTS = (nn.TransformerEncoderLayer,)


def plan(model: nn.Module, min_sparsity: Optional[float] = None,
         example_inputs: Optional[Union[Tensor, Sequence[Tensor]]] = None) -> Dict[str, Decision]:
    """sparsify()'s decision for every Linear/Conv2d layer, by name, without changing ``model``.

    >>> for name, d in plan(model, example_inputs=x[:1]).items():
    ...     print(name, d.swap, d.reason)        # e.g. "fc1 True timed: dense 0.310 ms, sparse 0.052 ms"
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if min_sparsity is not None:
        if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)):
            raise TypeError(f"`min_sparsity` must be a float in [0, 1] or None, got {min_sparsity!r}")
        if not 0 <= min_sparsity <= 1:
            raise ValueError(f"`min_sparsity` must be in [0, 1], got {min_sparsity}")
    if example_inputs is not None:
        example_inputs = as_inputs(example_inputs, tensors_only=True)

    decisions, eligible = _candidates(model)
    if not eligible:
        return decisions
    shapes = None
    if example_inputs is not None:  # one forward: the input shapes, and the layers read from outside
        shapes, reads = _trace(model, tuple(example_inputs), eligible)
        _keep_read_layers(decisions, eligible, reads)
    if min_sparsity is not None:
        _decide_by_threshold(decisions, eligible, min_sparsity)
    elif shapes is not None:
        _decide_by_timing(decisions, eligible, shapes)
    else:
        _decide_by_cost_model(decisions, eligible)
    return decisions


def _candidates(model: nn.Module) -> Tuple[Dict[str, Decision], Dict[str, nn.Module]]:
    """A "stays" decision for every Linear/Conv2d layer (with the reason, for the ineligible ones),
    and the eligible layers by name."""
    decisions: Dict[str, Decision] = {}
    eligible: Dict[str, nn.Module] = {}
    users: Dict[int, int] = {}  # weight id -> number of distinct modules holding it
    for module in {id(m): m for m in model.modules()}.values():
        for param in module.parameters(recurse=False):
            users[id(param)] = users.get(id(param), 0) + 1
    read_directly = {id(child) for parent in model.modules() if isinstance(parent, _READS_CHILD_WEIGHTS)
                     for child in parent.children()}
    for name, layer in model.named_modules():
        if not is_prunable(layer) or base_type(layer) not in SPARSE_CLASS:
            continue
        sparsity, reason = _eligibility(layer, users)
        if reason is None and id(layer) in read_directly:
            reason = ("its parent reads the weight directly (the nn.TransformerEncoderLayer inference "
                      "fast path): stays as it is")
        decisions[name] = Decision(name, sparsity, False, reason or "")
        if reason is None:
            eligible[name] = layer
    return decisions, eligible


def _decide_by_threshold(decisions: Dict[str, Decision], eligible: Dict[str, nn.Module],
                         min_sparsity: float) -> None:
    """Rule 1: every eligible layer at or above ``min_sparsity`` is swapped, nothing is timed."""
    for name in eligible:
        d = decisions[name]
        d.swap = d.sparsity >= min_sparsity
        d.reason = f"sparsity {d.sparsity:.3f} {'>=' if d.swap else '<'} min_sparsity {min_sparsity}"


def _decide_by_timing(decisions: Dict[str, Decision], eligible: Dict[str, nn.Module],
                      shapes: Dict[str, List[torch.Size]]) -> None:
    """Rule 2: the faster of the layer and its sparse module on the shapes it was called with."""
    for name, layer in eligible.items():
        d = decisions[name]
        if not shapes.get(name):
            d.reason = "not called by example_inputs: left as it is"
            continue
        dense_s, sparse_s = time_layer(layer, shapes[name])
        d.swap = sparse_s < dense_s
        d.reason = f"timed: dense {dense_s * 1e3:.3f} ms, sparse {sparse_s * 1e3:.3f} ms"


def _decide_by_cost_model(decisions: Dict[str, Decision], eligible: Dict[str, nn.Module]) -> None:
    """Rule 3: swapped at or above the largest measured break-even of the layer's kind (CPU only)."""
    for name, layer in eligible.items():
        d = decisions[name]
        if layer.weight.device.type != "cpu":
            d.reason = (f"on {layer.weight.device}: the cost model holds CPU measurements; pass "
                        "example_inputs (timed on the device) or min_sparsity")
            continue
        kind = _kind(layer)
        levels = BREAK_EVEN[kind].values()
        if None in levels:
            d.reason = f"cost model: the sparse {kind} kernel did not beat dense at every batch measured"
            continue
        threshold = max(levels)
        d.swap = d.sparsity >= threshold
        d.reason = (f"cost model: {kind} sparsity {d.sparsity:.3f} {'>=' if d.swap else '<'} "
                    f"break-even {threshold}")


def _eligibility(layer: nn.Module, users: Dict[int, int]) -> Tuple[float, Optional[str]]:
    """(stored sparsity, None) for a layer sparsify may swap, else (sparsity, why it stays)."""
    weight = layer.weight
    devices = kernel_devices("sparse_linear")
    if weight.device.type == "meta":  # no values: nothing to count or pack
        return float("nan"), f"on meta: no values; this build's sparse kernels run on {', '.join(devices)}"
    mask = get_mask(layer)
    kept = int(mask.sum()) if mask is not None else int(torch.count_nonzero(weight.detach()))
    sparsity = 1.0 - kept / weight.numel() if weight.numel() else 0.0
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return sparsity, f"grouped convolution (groups={layer.groups}): no sparse kernel, stays dense"
    if weight.device.type not in devices:
        return sparsity, f"on {weight.device}: this build's sparse kernels run on {', '.join(devices)} only"
    if weight.dtype not in SPARSE_DTYPES:
        return sparsity, f"{weight.dtype}: the sparse kernels take {[str(d) for d in SPARSE_DTYPES]}"
    if users.get(id(weight), 0) > 1:
        return sparsity, "weight shared with another module: stays as it is"
    if sparsity == 0.0:
        return sparsity, "not pruned"
    return sparsity, None


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear_nm" if nm_pattern(layer) else "linear_block" if block_pattern(layer) else "linear"
    return "conv1x1" if tuple(layer.kernel_size) == (1, 1) else "conv"


def _keep_read_layers(decisions: Dict[str, Decision], eligible: Dict[str, nn.Module],
                      reads: Dict[str, Tuple[List[str], str]]) -> None:
    """Layers whose attributes code outside their forward read stay dense: the sparse module lacks
    them (``weight``), or the code treats the layer as a dense one (it may reach the weight on
    inputs the example did not take: T5's dtype check on ``wo.weight``)."""
    for name, (attributes, reader) in reads.items():
        verb = "is" if len(attributes) == 1 else "are"
        decisions[name].reason = (f"its {' and '.join(attributes)} {verb} read outside its forward "
                                  f"(by {reader}); kept dense")
        del eligible[name]


def input_shapes(model: nn.Module, inputs: Tuple[Tensor, ...], layers: Dict[str, nn.Module]
                 ) -> Dict[str, List[torch.Size]]:
    """The distinct input shapes each of ``layers`` is called with in one ``model(*inputs)`` (eval mode)."""
    return _trace(model, inputs, layers)[0]


def _trace(model: nn.Module, inputs: Tuple[Tensor, ...], layers: Dict[str, nn.Module]
           ) -> Tuple[Dict[str, List[torch.Size]], Dict[str, Tuple[List[str], str]]]:
    """One ``model(*inputs)``: the distinct input shapes each layer is called with, and, for the
    layers whose attributes other code reads (see :class:`_OutsideReads`), which and by whom."""
    shapes: Dict[str, List[torch.Size]] = {name: [] for name in layers}
    names = {id(layer): name for name, layer in layers.items()}

    def hook(module: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], Tensor):
            seen = shapes[names[id(module)]]
            if args[0].shape not in seen:
                seen.append(args[0].shape)

    handles = [layer.register_forward_pre_hook(hook) for layer in layers.values()]
    with hooked_eval(model, handles), _OutsideReads(layers) as reads:
        model(*inputs)
    return shapes, reads.found


class _OutsideReads:
    """Notes reads of a layer's ``weight``, ``bias`` and of every attribute its sparse module would
    lack (``weight_mask``, a conv's ``groups``, one set on the layer by hand) made by code other
    than the layer's own call (its forward and its hooks): a parent's forward, a hook elsewhere.

    While active, each layer's class is swapped for a recording subclass (one per class) whose
    ``__getattribute__`` notes such reads; on exit every class is put back, even after an error,
    and the layers hold nothing they did not hold before (the state lives here).
    """

    def __init__(self, layers: Dict[str, nn.Module]) -> None:
        self.layers = layers
        self.found: Dict[str, Tuple[List[str], str]] = {}  # name -> (attributes, reader)
        self._names = {id(layer): name for name, layer in layers.items()}
        sparse_names = {base: set(dir(make())) for base, make in _SPARSE_TEMPLATE.items()}
        self._watched = {id(layer): _lacking(layer, sparse_names[base_type(layer)]) for layer in layers.values()}
        self._depth = {id(layer): 0 for layer in layers.values()}  # > 0: inside the layer's own call
        self._recording: Dict[type, type] = {}
        self._swapped: List[Tuple[nn.Module, type]] = []

    def __enter__(self) -> "_OutsideReads":
        try:
            for layer in self.layers.values():
                cls = type(layer)
                if cls not in self._recording:
                    self._recording[cls] = self._recording_class(cls)
                layer.__class__ = self._recording[cls]
                self._swapped.append((layer, cls))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer, cls in reversed(self._swapped):
            layer.__class__ = cls
        self._swapped.clear()

    def _note(self, key: int, attribute: str, frame: Any) -> None:
        attributes, _ = self.found.setdefault(self._names[key], ([], _where(frame)))  # the first reader
        if attribute not in attributes:
            attributes.append(attribute)

    def _recording_class(self, base: type) -> type:
        watched, depth, note = self._watched, self._depth, self._note

        def __getattribute__(layer: nn.Module, attribute: str) -> Any:
            key = id(layer)
            if not depth[key] and attribute in watched[key]:
                note(key, attribute, sys._getframe(1))
            return base.__getattribute__(layer, attribute)

        def __call__(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
            depth[id(layer)] += 1
            try:
                return base.__call__(layer, *args, **kwargs)
            finally:
                depth[id(layer)] -= 1

        return type(base.__name__, (base,), {"__getattribute__": __getattribute__, "__call__": __call__,
                                             "__module__": base.__module__, "__qualname__": base.__qualname__})


def _lacking(layer: nn.Module, sparse_names: set) -> frozenset:
    """``weight``, ``bias`` and the attributes of ``layer`` that its sparse module does not have
    (``sparse_names``: ``dir()`` of one); dunder names are left to Python."""
    lacking = {name for name in set(dir(layer)) - sparse_names if not name.startswith("__")}
    return frozenset(lacking | {"weight", "bias"})


# A small sparse module for each layer type, to learn which attributes the sparse modules have.
_SPARSE_TEMPLATE = {nn.Linear: lambda: SparseLinear(1, 1, dtype=torch.float32),
                    nn.Conv2d: lambda: SparseConv2d(1, 1, 1, dtype=torch.float32)}


def _where(frame: Any) -> str:
    """The function a frame runs, by qualified name (``T5DenseActDense.forward``)."""
    code = frame.f_code
    return getattr(code, "co_qualname", code.co_name)


# Timing budget per layer: enough calls for a stable median, at most ~0.2 s for slow layers.
_MIN_CALLS, _MAX_CALLS, _TARGET_SECONDS = 5, 50, 0.1


def time_layer(layer: nn.Module, shapes: List[torch.Size], sparse: Optional[nn.Module] = None) -> Tuple[float, float]:
    """(dense seconds, sparse seconds): ``layer`` and ``sparse`` (by default its sparse module)
    called on random inputs of each shape, medians of interleaved calls, summed over the shapes."""
    sparse = SPARSE_CLASS[base_type(layer)].from_dense(layer) if sparse is None else sparse
    generator = torch.Generator().manual_seed(0)
    device = layer.weight.device
    totals = [0.0, 0.0]
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape, generator=generator, dtype=layer.weight.dtype).to(device)
            runners = {"dense": lambda: layer(x), "sparse": lambda: sparse(x)}  # noqa: B023 (used in this pass)
            seconds = warm_up(runners, 1, device)
            calls = min(_MAX_CALLS, max(_MIN_CALLS, int(_TARGET_SECONDS / max(seconds, 1e-9))))
            median = medians(sample_interleaved(runners, calls, device))
            totals[0] += median["dense"]
            totals[1] += median["sparse"]
    return totals[0], totals[1]
