"""Per-layer accounting of a (pruned) model: parameters, nonzeros, sparsity and MACs.

Definitions used throughout (one row per module that owns parameters directly):

* ``params``: every parameter the module owns itself (``recurse=False``), weight and bias.
* ``nonzeros``: nonzero *effective* entries of those parameters. A pruned layer's effective
  weight is ``where(weight_mask, weight, 0)``, so masked-out weights count as zero even if the
  stored value is not; other parameters (bias, BN affine, ...) count their own nonzeros.
* ``sparsity``: fraction of zero effective entries of the module's ``weight`` parameter (the
  tensor pruning acts on). A module without a ``weight`` parameter uses all its own parameters.
  The totals row applies the same definition summed over all rows.
* ``macs_dense`` / ``macs_effective``: multiply-accumulates of Linear and Conv1d/2d/3d layers.
  A weight entry is used once per output position, so ``dense = positions * weight.numel()`` and
  ``effective = positions * nonzero effective weights``. Bias adds are not MACs, and zeros that
  padding feeds in at the borders are not discounted. Without ``example_inputs`` a Linear layer
  reports one position (one sample, one token) and a conv reports ``None`` (its output size is
  unknown). With ``example_inputs`` one forward is traced: Linear positions are
  ``prod(input.shape[:-1])``, conv positions ``N * prod(output spatial size)``, and a layer
  called several times sums its calls (a layer never called reports 0).
* ``tp.sparsity(model)`` is the totals' sparsity over the prunable and ``tp.nn`` sparse layers only:
  the one number to compare with a pruning target.
* ``tp.nn`` sparse layers report their dense weight shape, MACs and sparsity, and ``params`` counts
  what they store (the packed values and the bias). A ``Note`` column appears when some layer
  runs on the sparse kernel, or is a pruned grouped convolution (no sparse kernel: it runs dense).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..calibration import as_inputs
from ..masking import base_type, effective_weight, prunable_layers
from ..nn.sparse import SparseConv2d, SparseLayer, SparseLinear
from ..state import hooked_eval

__all__ = ["Summary", "summary", "sparsity"]

# Layers whose MACs are counted; others (norms, embeddings, attention matmuls) are not.
_MAC_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, SparseLinear, SparseConv2d)
_NOTE = ("note", "Note", False)  # shown only when some row has a note

_COLUMNS = (  # (row key, header, right-aligned)
    ("name", "Layer", False),
    ("type", "Type", False),
    ("weight_shape", "Weight shape", False),
    ("params", "Params", True),
    ("nonzeros", "Nonzeros", True),
    ("sparsity", "Sparsity", True),
    ("macs_dense", "MACs (dense)", True),
    ("macs_effective", "MACs (effective)", True),
)


class Summary:
    """The result of :func:`summary`: ``rows`` (one dict per layer) and ``totals`` (one dict).

    Row keys: ``name``, ``type``, ``weight_shape`` (list of ints or None), ``params``,
    ``nonzeros``, ``sparsity`` (float in [0, 1]), ``macs_dense``, ``macs_effective`` (int or
    None). ``totals`` has the same numeric keys; its MACs are None when any counted layer's are.
    """

    def __init__(self, rows: List[Dict[str, Any]], totals: Dict[str, Any]) -> None:
        self.rows = rows
        self.totals = totals

    def to_dict(self) -> Dict[str, Any]:
        """Plain python types only (JSON-serialisable): ``{"layers": rows, "totals": totals}``."""
        return {"layers": [dict(r) for r in self.rows], "totals": dict(self.totals)}

    def _columns(self) -> Tuple[Tuple[str, str, bool], ...]:
        return _COLUMNS + ((_NOTE,) if any(row.get("note") for row in self.rows) else ())

    def _cells(self) -> Tuple[List[str], List[List[str]], List[str]]:
        columns = self._columns()
        headers = [header for _, header, _ in columns]
        body = [[_format(key, row.get(key, "")) for key, _, _ in columns] for row in self.rows]
        total = {"name": "Total", "type": "", "weight_shape": "", "note": "", **self.totals}
        return headers, body, [_format(key, total[key]) for key, _, _ in columns]

    def __str__(self) -> str:
        headers, body, total = self._cells()
        widths = [max(len(r[i]) for r in [headers, total, *body]) for i in range(len(headers))]

        def line(cells: Sequence[str]) -> str:
            parts = [c.rjust(w) if right else c.ljust(w)
                     for c, w, (_, _, right) in zip(cells, widths, self._columns())]
            return "  ".join(parts).rstrip()

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        return "\n".join([line(headers), rule, *(line(r) for r in body), rule, line(total)])

    __repr__ = __str__

    def to_markdown(self) -> str:
        """The same table as GitHub-flavoured Markdown, numeric columns right-aligned."""
        headers, body, total = self._cells()
        total = [f"**{c}**" if c else c for c in total]

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        align = ["---:" if right else ":---" for _, _, right in self._columns()]
        return "\n".join([line(headers), "|" + "|".join(align) + "|",
                          *(line(r) for r in body), line(total)])

    _repr_markdown_ = to_markdown  # rendered tables in Jupyter


def summary(model: nn.Module,
            example_inputs: Optional[Union[Tensor, Sequence[Tensor]]] = None) -> Summary:
    """Tabulate params, nonzeros, sparsity and dense/effective MACs per layer of ``model``.

    Pass ``example_inputs`` (called as ``model(*example_inputs)``) to get exact MACs for that
    input, convolutions included; the forward runs once in eval mode under ``torch.no_grad()``
    and the model's train/eval modes are restored afterwards. See the module docstring for the
    precise definitions. Parameters shared by several modules count once in the totals.

        s = tp.summary(model, example_inputs=torch.randn(1, 3, 32, 32))
        print(s)                       # fixed-width text table
        s.totals["macs_effective"]     # or s.to_dict() / s.to_markdown()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    positions = (None if example_inputs is None
                 else _trace_positions(model, as_inputs(example_inputs, tensors_only=True)))
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        raise ValueError("`model` has uninitialized (lazy) parameters; pass `example_inputs` "
                         "so that one forward can materialise them")
    rows: List[Dict[str, Any]] = []
    totals = _Totals()
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if own:  # one row per module that owns parameters directly
            rows.append(_layer_row(name, module, own, positions, totals))
    return Summary(rows, totals.as_dict())


class _Totals:
    """The totals row, summed layer by layer; a parameter shared by several modules counts once."""

    def __init__(self) -> None:
        self.seen: set = set()  # ids of the parameters already counted (tied weights)
        self.params = self.nonzeros = self.zeros = self.counted = 0
        self.macs: Dict[str, Optional[int]] = {"macs_dense": 0, "macs_effective": 0}

    def add_macs(self, dense: Optional[int], effective: Optional[int]) -> None:
        """A counted layer's MACs; one unknown (None) makes the total unknown."""
        for key, value in (("macs_dense", dense), ("macs_effective", effective)):
            current = self.macs[key]
            self.macs[key] = None if current is None or value is None else current + value

    def add_layer(self, own: List[Tuple[str, nn.Parameter]], nonzeros: Dict[str, int],
                  measured: List[Tensor], zeros: int, counted: int) -> None:
        """A row's parameters and the zeros/count of the tensors its sparsity is measured on."""
        if not any(id(p) in self.seen for p in measured):  # a tied weight counts once in the totals
            self.zeros += zeros
            self.counted += counted
        for pname, p in own:
            if id(p) not in self.seen:
                self.seen.add(id(p))
                self.params += p.numel()
                self.nonzeros += nonzeros[pname]

    def as_dict(self) -> Dict[str, Any]:
        return {"params": self.params, "nonzeros": self.nonzeros,
                "sparsity": self.zeros / self.counted if self.counted else 0.0, **self.macs}


def _layer_row(name: str, module: nn.Module, own: List[Tuple[str, nn.Parameter]],
               positions: Optional[Dict[int, int]], totals: _Totals) -> Dict[str, Any]:
    """The summary row of one module that owns parameters (``own``); adds its counts to ``totals``."""
    # masked-out weights count as zero whatever is stored
    nonzeros = {pname: int(torch.count_nonzero(effective_weight(module) if pname == "weight" else p.detach()))
                for pname, p in own}
    sparse = isinstance(module, SparseLayer)  # its weight is `values`, packed from dense_shape
    key = "values" if sparse else "weight"
    weight = dict(own).get(key)
    shape = list(module.dense_shape) if sparse else list(weight.shape) if weight is not None else None
    if weight is not None:  # sparsity is measured on the weight pruning acts on
        counted = math.prod(shape)
        zeros = counted - nonzeros[key]
    else:
        counted = sum(p.numel() for _, p in own)
        zeros = counted - sum(nonzeros.values())
    dense = effective = None
    if isinstance(module, _MAC_TYPES) and weight is not None:
        n = positions.get(id(module), 0) if positions is not None else (
            1 if isinstance(module, (nn.Linear, SparseLinear)) else None)
        if n is not None:
            dense, effective = n * counted, n * nonzeros[key]
        totals.add_macs(dense, effective)
    totals.add_layer(own, nonzeros, [weight] if weight is not None else [p for _, p in own], zeros, counted)
    return {
        "name": name,
        "type": base_type(module).__name__,  # MaskedLinear reports Linear
        "weight_shape": shape,
        "params": sum(p.numel() for _, p in own),
        "nonzeros": sum(nonzeros.values()),
        "sparsity": zeros / counted if counted else 0.0,
        "macs_dense": dense,
        "macs_effective": effective,
        "note": _note(module, zeros),
    }


def sparsity(model: nn.Module) -> float:
    """Fraction of zero entries in the effective weights of all prunable layers (0.0 if none).

    Counts masked-out weights and weights that are exactly zero (e.g. after `make_permanent`),
    and the dense weights of ``tp.nn`` sparse layers (their unstored entries and stored zeros).

    >>> tp.prune(model, sparsity=0.9, scope="global")
    >>> round(tp.sparsity(model), 3)
    0.9
    """
    zeros = total = 0
    seen = set()  # a weight tied between layers counts once
    for layer in prunable_layers(model).values():
        if id(layer.weight) in seen:
            continue
        seen.add(id(layer.weight))
        weight = effective_weight(layer)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    for layer in {id(m): m for m in model.modules() if isinstance(m, SparseLayer)}.values():
        numel = math.prod(layer.dense_shape)
        zeros += numel - int(torch.count_nonzero(layer.values.detach()))
        total += numel
    return zeros / total if total else 0.0


def _trace_positions(model: nn.Module, inputs: Tuple[Tensor, ...]) -> Dict[int, int]:
    """Run ``model(*inputs)`` once and return {id(layer): output positions summed over calls}."""
    positions: Dict[int, int] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, Tensor):
            return
        channels = module.out_features if isinstance(module, (nn.Linear, SparseLinear)) else module.out_channels
        # output.numel() / channels == prod(input.shape[:-1]) for Linear, N * prod(spatial) for conv
        count = output.numel() // channels if channels else 0
        positions[id(module)] = positions.get(id(module), 0) + count

    with hooked_eval(model, [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _MAC_TYPES)]):
        model(*inputs)
    return positions


def _note(module: nn.Module, zeros: int) -> str:
    """Which kernel a pruned layer runs on, where that is not the obvious one."""
    if isinstance(module, SparseLayer):
        if module.nm:
            return f"N:8 sparse kernel ({module.nm}:8)"
        return "sparse kernel (CSR)" if module.block_rows == 1 else f"block-sparse kernel ({module.block_rows}x1)"
    if isinstance(module, nn.Conv2d) and module.groups > 1 and zeros:
        return "groups > 1: no sparse kernel, runs dense"
    return ""


def _format(key: str, value: Any) -> str:
    if key == "name":
        return value or "(root)"
    if key in ("type", "weight_shape", "note") and value == "":
        return ""  # the totals row leaves these blank
    if value is None:
        return "-"
    if key == "weight_shape":
        return "(" + ", ".join(str(d) for d in value) + ")"
    if key == "sparsity":
        return f"{100 * value:.2f}%"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
