"""Sparse layers: a pruned ``nn.Linear`` / ``nn.Conv2d`` stored and multiplied in CSR (or block) form.

A masked layer (``tp.prune``) still stores and multiplies the whole dense weight; these modules keep
only the kept weights, packed row by row (CSR: int32 row pointers, int16 column indices when the
input size is below 65536, else int32, and the values), and run the C++ sparse kernels
(``torch.ops.torchprune.sparse_linear`` / ``sparse_conv2d``) on them. So the layer is smaller (a
90%-sparse fp32 layer stores 6 bytes per kept weight instead of 4 per weight: 15% of the dense size)
and, where the kernel beats the dense product for the shape and batch (see ``tp.sparsify``), faster.

* ``values`` is an ``nn.Parameter``: a sparse model fine-tunes, and only the stored weights move
  (pruned weights are not stored, so nothing can bring them back).
* ``row_ptr`` and ``col_idx`` are buffers; the state_dict holds the packed form and the dense shape
  (``_extra_state``), and loads into any sparse module of the same layer shape whatever its
  number of nonzeros (the tensors are resized, after every key has been checked).
* A Linear whose mask is made of whole R x 1 blocks (``granularity="block:4x1"`` or ``"block:8x1"``)
  is stored in blocks instead (``format`` says "bsr 4x1"): ``values`` is ``[blocks, R]``,
  ``row_ptr`` points at block rows, and ``torch.ops.torchprune.block_sparse_linear`` computes it
  (``torchprune/ops/bsr.py``; at 128-512 token rows on transformer shapes 0.9-2.0x CSR on the same
  weight, and faster than dense from 50% sparsity where CSR needs about 70%).
* A Linear pruned 2:4 or 4:8 (``granularity="2:4"``: at most 4 of every 8 consecutive input weights)
  is stored in the N:8 format instead (``format`` says "nm 4:8"; ``from_dense(nm=n)`` stores any
  mask with at most n of 8, e.g. 1:4 as n = 2):
  ``values`` holds n slots per window of 8 columns, ``col_idx`` the slots' 3-bit positions packed 8
  to an int32, ``row_ptr`` is regular, and ``torch.ops.torchprune.nm_sparse_linear`` computes it
  (``torchprune/ops/nm.py``; 4.5 bytes per stored fp32 weight; for 2:4 at batch 1, 1.5-2.9x F.linear from
  768x768 up; from 16 rows of x on, no faster than dense).
* Conv weights ``[out, in, kh, kw]`` are packed as ``[out, in * kh * kw]``; grouped and depthwise
  convolutions are not supported (``tp.sparsify`` leaves them dense).
* There is no ``weight`` attribute (``dense_weight()`` gives the dense weight): reading it raises an
  AttributeError that says so and how ``tp.sparsify`` keeps dense the layers whose weight a parent
  reads; ``hasattr(layer, "weight")`` is False.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import describe
from ..ops.csr import IntPair, index_dtype
from ..ops.devices import kernel_devices
from .conv import conv_input_and_padding
from .masked import get_mask

__all__ = ["SparseLinear", "SparseConv2d", "SparseLayer", "SPARSE_DTYPES", "block_pattern", "nm_pattern"]

_FORMATS = ("csr", "bsr", "nm")
#: The slots per window of 8 input columns that from_dense stores as N:8 by itself: 4 (2:4, 4:8).
#: Sparser N:M masks (1:4, 2:8, 1:8) stay CSR unless asked for: their N:8 kernels measured no faster
#: than CSR on the same weight at batch 1 (0.89-1.08x, 1:4) and slower at 4-8 rows; the portable
#: loop serves n outside {1, 2, 4}.
NM_AUTO_SLOTS = 4
#: The least fraction of the N:8 slots that must hold kept weights for from_dense to choose the format.
NM_MIN_FILL = 0.95
#: Weight dtypes the sparse kernels compute in.
SPARSE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class SparseLayer(nn.Module):
    """Packed storage, state_dict handling and statistics shared by the sparse layers (the base
    class ``tp.summary``, ``tp.sparsity`` and the report recognise them by).

    Subclasses set ``_dense_shape`` (the weight's dense shape) before calling ``_init_packed``.
    ``block_rows`` is 1 for CSR, R for R x 1 blocks (``values`` is then ``[blocks, R]`` and
    ``row_ptr`` has one entry per block row, plus one). ``nm`` is 0, or n for the N:8 format
    (``ops.pack_nm``): ``values`` is the flat ``[out, in / 8 * n]`` slots, ``col_idx`` the flat int32
    codes, ``row_ptr`` regular (row r starts at r * in / 8 * n).
    """

    block_rows: int = 1
    nm: int = 0

    _dense_shape: Tuple[int, ...]
    values: nn.Parameter
    row_ptr: Tensor
    col_idx: Tensor
    bias: Optional[nn.Parameter]

    def _init_packed(self, bias: bool, dtype: Optional[torch.dtype], device) -> None:
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in SPARSE_DTYPES:
            raise TypeError(f"`dtype` must be one of {[str(d) for d in SPARSE_DTYPES]}, got {dtype}")
        rows = self._dense_shape[0] // self.block_rows
        # A fresh module holds no weights (nnz = 0): fill it with from_dense() or load_state_dict().
        # The N:8 format has a fixed number of slots, so a fresh N:8 module stores zeros in all of them.
        self.values = nn.Parameter(torch.empty(self._values_shape(0), dtype=dtype, device=device))
        self.register_buffer("row_ptr", torch.zeros(rows + 1, dtype=torch.int32, device=device))
        self.register_buffer("col_idx", torch.empty(0, dtype=self._index_dtype(self.nm), device=device))
        if self.nm:
            codes, values = ops.pack_nm(torch.zeros(self._dense_shape[0], self._columns, dtype=dtype, device=device),
                                        self.nm)
            self.row_ptr, self.col_idx, self.values.data = self._nm_packed(codes, values)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self._dense_shape[0], dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    def __getattr__(self, name: str) -> Any:
        # A clearer AttributeError for the dense layer's ``weight``, still an AttributeError so that
        # hasattr() and getattr(layer, "weight", None) keep working. Python calls this whenever normal
        # lookup fails, which includes every parameter and buffer (they live in nn.Module's dicts,
        # not in __dict__): the forwards read theirs through _packed instead.
        if name == "weight":
            raise AttributeError(
                f"'{type(self).__name__}' has no attribute 'weight': it stores only the kept weights "
                "(values, row_ptr, col_idx; dense_weight() gives the dense one). If code outside this "
                "layer's forward (its parent's forward) reads its weight, call "
                "tp.sparsify(model, example_inputs=...) so that such layers are detected and kept dense"
            )
        return super().__getattr__(name)

    def _index_dtype(self, nm: int) -> torch.dtype:
        """col_idx's dtype: int32 codes in the N:8 format, else the column index dtype."""
        return torch.int32 if nm else index_dtype(self._columns)

    def _nm_shapes(self, nm: int) -> Tuple[int, int]:
        """(slots, codes) per row of the N:8 format with ``nm`` slots per window."""
        slots = self._columns // ops.nm.WINDOW * nm
        return slots, -(-slots // ops.nm.WINDOW)

    def _nm_row_ptr(self, slots: int, device) -> Tensor:
        """The N:8 format's regular row pointers: row r starts at r * slots."""
        return torch.arange(self._dense_shape[0] + 1, dtype=torch.int32, device=device) * slots

    def _nm_packed(self, codes: Tensor, values: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(row_ptr, col_idx, values) as this module stores a ``pack_nm`` result: flat codes and values."""
        return self._nm_row_ptr(values.shape[1], values.device), codes.reshape(-1), values.reshape(-1)

    def _packed(self) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(row_ptr, col_idx, values, bias), read from nn.Module's dicts. ``self.row_ptr`` and the
        rest would each take two Python calls, this class's __getattr__ and nn.Module's: about 3 us
        a forward (8.9 -> 5.8 us a call at 8x8), 7% of a 384 x 384 layer's 42 us at 128 rows
        (all-MiniLM-L6-v2, 90%, Intel Xeon)."""
        buffers, parameters = self._buffers, self._parameters
        return buffers["row_ptr"], buffers["col_idx"], parameters["values"], parameters["bias"]

    def _nm_tensors(self) -> Tuple[Tensor, Tensor]:
        """(codes, values) as the 2-D tensors nm_sparse_linear takes (views: values stays a leaf's view)."""
        rows = self._dense_shape[0]
        slots, chunks = self._nm_shapes(self.nm)
        return self.col_idx.view(rows, chunks), self.values.view(rows, slots)

    def _values_shape(self, entries: int) -> Tuple[int, ...]:
        return (entries,) if self.block_rows == 1 else (entries, self.block_rows)

    @property
    def _columns(self) -> int:
        columns = 1
        for size in self._dense_shape[1:]:
            columns *= size
        return columns

    def _pack(self, layer: nn.Module) -> None:
        """Packs ``layer``'s weight (its mask's kept entries, or its nonzeros) and copies its bias."""
        weight = layer.weight.detach()
        mask = get_mask(layer)
        rows = weight.shape[0]
        weight, mask = weight.reshape(rows, self._columns), None if mask is None else mask.reshape(rows, self._columns)
        if self.nm:
            row_ptr, col_idx, values = self._nm_packed(*ops.pack_nm(weight, self.nm, mask))
        elif self.block_rows == 1:
            row_ptr, col_idx, values = ops.pack_csr(weight, mask)
        else:
            row_ptr, col_idx, values = ops.pack_bsr(weight, self.block_rows, mask)
        with torch.no_grad():
            self.values.data = values
            self.row_ptr = row_ptr
            self.col_idx = col_idx
            if layer.bias is not None:
                self.bias.copy_(layer.bias.detach())
        self.train(layer.training)

    @staticmethod
    def _check_source(layer: nn.Module, argument: str) -> None:
        weight = layer.weight
        devices = kernel_devices("sparse_linear")
        if weight.device.type not in devices:
            raise ValueError(
                f"`{argument}` is on {weight.device}; this build's sparse kernels run on "
                f"{', '.join(devices)} only: move the layer first (layer.cpu()), or use a CUDA build"
            )
        if weight.dtype not in SPARSE_DTYPES:
            raise TypeError(
                f"`{argument}` weight must be one of {[str(d) for d in SPARSE_DTYPES]}, got {weight.dtype}"
            )

    @property
    def dense_shape(self) -> Tuple[int, ...]:
        """The shape of the dense weight this layer stores in packed form, e.g. ``(out, in)``."""
        return self._dense_shape

    @property
    def nnz(self) -> int:
        """Number of stored weights (the kept entries of the mask, zeros among them included)."""
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the dense weight that is not stored."""
        total = self._dense_shape[0] * self._columns
        return 1.0 - self.nnz / total if total else 0.0

    @property
    def _format_name(self) -> str:
        return "nm" if self.nm else "csr" if self.block_rows == 1 else "bsr"

    @property
    def format(self) -> str:
        """The storage with the index width, e.g. ``"csr (int16 col_idx)"``,
        ``"bsr 4x1 (int16 col_idx)"`` or ``"nm 4:8 (int32 codes)"``."""
        if self.nm:
            return f"nm {self.nm}:8 (int32 codes)"
        blocks = "" if self.block_rows == 1 else f" {self.block_rows}x1"
        return f"{self._format_name}{blocks} ({str(self.col_idx.dtype).replace('torch.', '')} col_idx)"

    def _filled(self, dense: nn.Module) -> nn.Module:
        """``dense`` (a fresh layer of the same shape) with this layer's weights, bias and mode."""
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense.train(self.training)

    def dense_weight(self) -> Tensor:
        """The dense weight (zeros where nothing is stored), detached, in ``_dense_shape``."""
        if self.nm:
            codes, values = self._nm_tensors()
            dense = ops.unpack_nm(codes, values.detach(), self._columns)
        elif self.block_rows == 1:
            dense = ops.unpack_csr(self.row_ptr, self.col_idx, self.values.detach(), self._columns)
        else:
            dense = ops.unpack_bsr(self.row_ptr, self.col_idx, self.values.detach(), self._columns)
        return dense.reshape(self._dense_shape)

    def _stats_repr(self) -> str:
        return f"nnz={self.nnz}, sparsity={self.sparsity:.3f}, format={self.format}"

    # -- state_dict: the packed tensors plus the dense shape, loadable across nnz -----------------

    def get_extra_state(self) -> Dict[str, Any]:
        state = {"format": self._format_name, "shape": list(self._dense_shape)}
        if self.block_rows > 1:
            state["block"] = [self.block_rows, 1]
        if self.nm:
            state["n"] = self.nm
        return state

    def set_extra_state(self, state: Any) -> None:
        error = self._extra_state_error(state)
        if error:
            raise ValueError(error)

    #: Whether this layer type can hold R x 1 blocks and the N:8 format (only the Linear has those kernels).
    _blocks_allowed = False

    def _state_layout(self, state: Any) -> Optional[Tuple[int, int]]:
        """The (block height, N:8 slots) a valid extra state describes ((1, 0) for CSR), None when
        it is not valid."""
        if not isinstance(state, dict) or state.get("format") not in _FORMATS:
            return None
        if state["format"] == "csr":
            return (1, 0) if "block" not in state and "n" not in state else None
        if state["format"] == "nm":
            n = state.get("n")
            if (not self._blocks_allowed or "block" in state or isinstance(n, bool) or not isinstance(n, int)
                    or not 1 <= n <= ops.nm.WINDOW or self._columns % ops.nm.WINDOW):
                return None
            return 1, n
        block = state.get("block")
        if (not self._blocks_allowed or "n" in state or not isinstance(block, (list, tuple)) or len(block) != 2
                or block[1] != 1):
            return None
        r = block[0]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1 or self._dense_shape[0] % r:
            return None
        return r, 0

    def _extra_state_error(self, state: Any, key: str = "_extra_state") -> Optional[str]:
        if self._state_layout(state) is None:
            allowed = "{'format': 'csr', 'shape': [...]}"
            if self._blocks_allowed:
                allowed += (", {'format': 'bsr', 'shape': [...], 'block': [R, 1]} with R dividing "
                            f"out_features = {self._dense_shape[0]}, or {{'format': 'nm', 'shape': [...], "
                            "'n': n}} with 1 <= n <= 8 and in_features a multiple of 8")
            return f"{key!r} must be a {allowed} dict, got {state!r}"
        if list(state.get("shape", ())) != list(self._dense_shape):
            return (
                f"{key!r}: the checkpoint holds a layer of dense shape {list(state.get('shape', ()))}, "
                f"this {type(self).__name__} has {list(self._dense_shape)}"
            )
        return None

    def _checkpoint_layout(self, state_dict: Dict[str, Any], prefix: str) -> Tuple[int, int]:
        """The (block height, N:8 slots) of the checkpoint under ``prefix``: its extra state's, else
        from the values' shape (2-D values are blocks), else this layer's."""
        state = state_dict.get(prefix + "_extra_state")
        if state is not None:
            return self._state_layout(state) or (self.block_rows, self.nm)
        values = state_dict.get(prefix + "values")
        if isinstance(values, Tensor) and values.dim() == 2:
            return values.shape[1], 0
        return self.block_rows, self.nm

    def _packed_errors(self, state_dict: Dict[str, Any], prefix: str, layout: Tuple[int, int]) -> List[str]:
        """Everything wrong with the packed tensors under ``prefix`` for ``layout`` (block height,
        N:8 slots; (1, 0): CSR; empty list: loadable)."""
        r, nm = layout
        keys = {name: prefix + name for name in ("values", "row_ptr", "col_idx", "_extra_state")}
        if keys["_extra_state"] in state_dict:
            error = self._extra_state_error(state_dict[keys["_extra_state"]], keys["_extra_state"])
            if error:
                return [error]
        tensors = {name: state_dict.get(key) for name, key in keys.items() if name != "_extra_state"}
        for name, tensor in tensors.items():
            dims = 2 if name == "values" and r > 1 else 1
            if not isinstance(tensor, Tensor) or tensor.dim() != dims:
                return [f"{keys[name]!r} must be a {dims}-D tensor, got {describe(tensor)}"]
        row_ptr, col_idx, values = tensors["row_ptr"], tensors["col_idx"], tensors["values"]
        if nm:
            return self._nm_errors(keys, row_ptr, col_idx, values, nm)
        if r > 1 and (not self._blocks_allowed or values.shape[1] != r or self._dense_shape[0] % r):
            return [f"{keys['values']!r} must be [blocks, {r}] for {r}x1 blocks dividing out_features = "
                    f"{self._dense_shape[0]} (a {type(self).__name__} "
                    f"{'holds blocks' if self._blocks_allowed else 'holds CSR only'}), got {describe(values)}"]
        rows, want = self._dense_shape[0] // r, index_dtype(self._columns)
        what = "out features + 1" if r == 1 else f"out features / {r} + 1"
        if row_ptr.dtype != torch.int32 or row_ptr.numel() != rows + 1:
            return [f"{keys['row_ptr']!r} must be int32 with {rows + 1} entries ({what}), "
                    f"got {row_ptr.dtype} with {row_ptr.numel()}"]
        if col_idx.dtype != want:
            return [f"{keys['col_idx']!r} must be {want} for {self._columns} input columns, "
                    f"got {col_idx.dtype}"]
        entries = values.shape[0]
        if not values.is_floating_point() or entries != col_idx.numel():
            return [f"{keys['values']!r} must be floating point with one entry per column index "
                    f"({col_idx.numel()}), got {values.dtype} with {entries}"]
        steps = row_ptr[1:].long() - row_ptr[:-1].long()
        if int(row_ptr[0]) != 0 or bool((steps < 0).any()) or int(row_ptr[-1]) != entries:
            return [f"{keys['row_ptr']!r} must start at 0, never decrease and end at the number of "
                    f"stored {'values' if r == 1 else 'blocks'} = {entries}"]
        columns = col_idx.long() & 0xFFFF if want == torch.int16 else col_idx.long()
        if columns.numel() and int(columns.max()) >= self._columns:
            return [f"{keys['col_idx']!r} holds column {int(columns.max())}, beyond the "
                    f"{self._columns} input columns"]
        try:  # the C++ walk of the whole structure, as the kernels expect it (ascending columns)
            ops.check_csr(row_ptr.contiguous(), col_idx.contiguous(), values.new_empty(entries), self._columns)
        except RuntimeError as error:
            return [f"{keys['col_idx']!r} / {keys['row_ptr']!r}: {error}"]
        return []

    def _nm_errors(self, keys: Dict[str, str], row_ptr: Tensor, col_idx: Tensor, values: Tensor,
                   nm: int) -> List[str]:
        """What is wrong with an N:8 pack with ``nm`` slots per window (empty list: loadable)."""
        rows = self._dense_shape[0]
        slots, chunks = self._nm_shapes(nm)
        if not values.is_floating_point() or values.numel() != rows * slots:
            return [f"{keys['values']!r} must be floating point with {rows * slots} entries (out_features x "
                    f"in_features / 8 x {nm}), got {values.dtype} with {values.numel()}"]
        if col_idx.dtype != torch.int32 or col_idx.numel() != rows * chunks:
            return [f"{keys['col_idx']!r} must be int32 codes with {rows * chunks} entries for {nm}:8, got "
                    f"{col_idx.dtype} with {col_idx.numel()}"]
        if row_ptr.dtype != torch.int32 or not torch.equal(row_ptr, self._nm_row_ptr(slots, row_ptr.device)):
            return [f"{keys['row_ptr']!r} must be int32 [0, {slots}, {2 * slots}, ...] ({slots} slots a row)"]
        try:
            ops.check_nm(col_idx.reshape(rows, chunks), values.reshape(rows, slots), self._columns)
        except ValueError as error:
            return [f"{keys['col_idx']!r}: {error}"]
        return []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        if prefix + "values" not in state_dict and prefix + "weight" in state_dict:
            error_msgs.append(
                f"{prefix + 'weight'!r} is a dense layer's weight; a {type(self).__name__} loads the "
                "packed keys (values, row_ptr, col_idx): load the dense state_dict into the dense "
                f"layer and convert it with {type(self).__name__}.from_dense"
            )
            return
        packed = [prefix + name for name in ("values", "row_ptr", "col_idx")]
        present = [key in state_dict for key in packed]
        if any(present) and not all(present):  # a partial pack could not be checked as a whole
            missing = ", ".join(repr(key) for key, here in zip(packed, present) if not here)
            error_msgs.append(f"{', '.join(map(repr, packed))} must be loaded together (the structure "
                              f"is checked as a whole before anything is copied); missing {missing}")
            return
        if all(present):
            layout = self._checkpoint_layout(state_dict, prefix)
            errors = self._packed_errors(state_dict, prefix, layout)
            if errors:
                error_msgs.extend(errors)
                return
            shape = tuple(state_dict[prefix + "values"].shape)
            with torch.no_grad():  # adopt the checkpoint's format and nnz; the base class copies into them
                if layout != (self.block_rows, self.nm):
                    self.block_rows, self.nm = layout
                    self.row_ptr = self.row_ptr.new_zeros(self._dense_shape[0] // self.block_rows + 1)
                    self.col_idx = self.col_idx.new_empty(0, dtype=self._index_dtype(self.nm))
                if tuple(self.values.shape) != shape:
                    self.values.data = self.values.new_empty(shape)
                entries = state_dict[prefix + "col_idx"].numel()
                if self.col_idx.numel() != entries:
                    self.col_idx = self.col_idx.new_empty(entries)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class SparseLinear(SparseLayer):
    """``y = x @ W.T + bias`` with ``W`` stored in CSR form, in R x 1 blocks (``block_rows`` = R), or
    with n slots in every 8 input columns (``nm`` = n, the N:8 format), and multiplied by the C++ kernel.

    >>> tp.prune(model, sparsity=0.9)
    >>> layer = tp.nn.SparseLinear.from_dense(model.fc)   # reads the mask (or the zeros)
    >>> torch.testing.assert_close(layer(x), model.fc(x))
    >>> tp.prune(model, sparsity=0.9, granularity="block:4x1")
    >>> tp.nn.SparseLinear.from_dense(model.fc).format    # whole 4x1 blocks: stored as blocks
    'bsr 4x1 (int16 col_idx)'
    >>> tp.prune(model, granularity="2:4")
    >>> tp.nn.SparseLinear.from_dense(model.fc).format    # 2 of every 4: 4 slots per 8 columns
    'nm 4:8 (int32 codes)'
    """

    _blocks_allowed = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: Optional[torch.dtype] = None, device=None, block_rows: int = 1, nm: int = 0) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TypeError(f"`{name}` must be an int >= 0, got {value!r}")
        _check_block_rows(block_rows, out_features)
        _check_nm(nm, block_rows, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.block_rows, self.nm = block_rows, nm
        self._dense_shape = (out_features, in_features)
        self._init_packed(bias, dtype, device)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_rows: Optional[int] = None,
                   nm: Optional[int] = None) -> "SparseLinear":
        """A SparseLinear that computes what ``linear`` computes (masked or with zeros).

        The format, when neither ``block_rows`` nor ``nm`` is given, follows the layer's mask (or,
        unmasked, its nonzeros) on the CPU, where those kernels run: N:8 with 4 slots when every
        window of 8 input columns keeps at most 4 weights and nearly all keep 4 (a 2:4 or 4:8 mask;
        see :func:`nm_pattern`), else R x 1 blocks (R = 8, else 4) when it is made of whole blocks, else CSR.
        ``block_rows`` = 1 forces CSR and R > 1 forces R x 1 blocks (a mask must then be made of
        whole blocks; without a mask, every block holding a nonzero is stored). ``nm`` = n forces
        the N:8 format with n slots a window (a window must keep at most n), ``nm`` = 0 forbids it.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"`linear` must be an nn.Linear, got {type(linear).__name__}")
        cls._check_source(linear, "linear")
        device = linear.weight.device.type
        for name, value, op, fallback in (("block_rows", block_rows, "block_sparse_linear", "block_rows=1, CSR"),
                                          ("nm", nm, "nm_sparse_linear", "nm=0")):
            if value not in (None, 0, 1) and device not in kernel_devices(op):
                raise ValueError(f"`{name}` = {value}: this build's {op} kernel runs on "
                                 f"{', '.join(kernel_devices(op))} only; `linear` is on {linear.weight.device} "
                                 f"(use {fallback})")
        if nm is None:
            nm = 0
            if block_rows is None and device in kernel_devices("nm_sparse_linear"):
                nm = nm_pattern(linear) or 0
        if block_rows is None:
            block_rows = 1
            if not nm and device in kernel_devices("block_sparse_linear"):
                block_rows = block_pattern(linear) or 1
        sparse = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     dtype=linear.weight.dtype, device=linear.weight.device, block_rows=block_rows, nm=nm)
        sparse._pack(linear)
        return sparse

    def forward(self, x: Tensor) -> Tensor:
        row_ptr, col_idx, values, bias = self._packed()
        if self.nm:
            codes, values = self._nm_tensors()
            return ops.nm_sparse_linear(x, codes, values, self.in_features, bias)
        if self.block_rows > 1:
            return ops.block_sparse_linear(x, row_ptr, col_idx, values, self.in_features, bias)
        return ops.sparse_linear(x, row_ptr, col_idx, values, self.in_features, bias)

    def to_dense(self) -> nn.Linear:
        """An equal plain ``nn.Linear`` (zeros where nothing is stored)."""
        return self._filled(nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                      dtype=self.values.dtype, device=self.values.device))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._stats_repr()}")


def block_pattern(linear: nn.Linear) -> Optional[int]:
    """R when ``linear``'s mask (unmasked: its nonzeros) is made of whole R x 1 blocks, R = 8 tried
    before 4; else None. What ``SparseLinear.from_dense`` and ``tp.sparsify``'s cost model go by."""
    mask = get_mask(linear)
    return ops.block_pattern_rows(mask if mask is not None else linear.weight.detach() != 0)


def nm_pattern(linear: nn.Linear) -> Optional[int]:
    """4 (``NM_AUTO_SLOTS``) when ``linear``'s mask (unmasked: its nonzeros) keeps at most 4 of every
    8 consecutive input weights (a 2:4 or 4:8 mask) with the windows nearly full (kept >=
    ``NM_MIN_FILL`` of the slots, as an N:M mask is: a mask that happens to keep at most 4 of 8 but
    far fewer on average would store mostly padding); else None. What ``SparseLinear.from_dense``
    and ``tp.sparsify``'s cost model go by."""
    mask = get_mask(linear)
    keep = mask if mask is not None else linear.weight.detach() != 0
    n = ops.nm_slots(keep)
    if n is None or n > NM_AUTO_SLOTS:
        return None
    n = NM_AUTO_SLOTS  # a window keeping fewer than 4 pads, within the fill rule below
    if int(keep.sum()) < NM_MIN_FILL * keep.numel() * n / ops.nm.WINDOW:
        return None
    return n


def _check_nm(nm, block_rows: int, in_features: int) -> None:
    if isinstance(nm, bool) or not isinstance(nm, int) or not 0 <= nm <= ops.nm.WINDOW:
        raise ValueError(f"`nm` must be an int in 0..8 (0: not N:8; n: n slots in every 8 input columns), got {nm!r}")
    if nm and block_rows != 1:
        raise ValueError(f"`nm` = {nm} and `block_rows` = {block_rows}: a layer is stored in one format, choose one")
    if nm and in_features % ops.nm.WINDOW:
        raise ValueError(f"`nm` = {nm} needs in_features to be a multiple of 8, got {in_features}")


def _check_block_rows(block_rows, out_features: int) -> None:
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"`block_rows` must be an int >= 1 (1: CSR, R: R x 1 blocks), got {block_rows!r}")
    if out_features % block_rows:
        raise ValueError(f"`block_rows` = {block_rows} must divide out_features = {out_features}")


class SparseConv2d(SparseLayer):
    """A 2-D convolution (groups=1) whose weight is stored in CSR form over ``[out, in*kh*kw]``.

    Takes ``nn.Conv2d``'s arguments (every padding mode, string padding, unbatched input).

    >>> tp.prune(model, sparsity=0.9)
    >>> conv = tp.nn.SparseConv2d.from_dense(model.conv1)
    >>> torch.testing.assert_close(conv(x), model.conv1(x))
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Union[str, IntPair] = 0, dilation: IntPair = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        # nn.Conv2d on the meta device validates the arguments and normalises them for us
        spec = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, False,
                         padding_mode, device="meta")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = spec.kernel_size, spec.stride, spec.dilation
        self.padding, self.padding_mode = spec.padding, spec.padding_mode
        self._reversed_padding_repeated_twice = spec._reversed_padding_repeated_twice
        self._dense_shape = (out_channels, in_channels, *spec.kernel_size)
        self._init_packed(bias, dtype, device)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> "SparseConv2d":
        """A SparseConv2d that computes what ``conv`` computes (masked or with zeros)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"`conv` must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"`conv` has groups={conv.groups}; SparseConv2d supports groups=1 only (grouped and "
                "depthwise convolutions stay dense)"
            )
        cls._check_source(conv, "conv")
        sparse = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.bias is not None, conv.padding_mode,
                     dtype=conv.weight.dtype, device=conv.weight.device)
        sparse._pack(conv)
        return sparse

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        x, padding = conv_input_and_padding(self, x)
        row_ptr, col_idx, values, bias = self._packed()
        y = ops.sparse_conv2d(x, row_ptr, col_idx, values, self.kernel_size, bias, self.stride, padding,
                              self.dilation)
        return y.squeeze(0) if unbatched else y

    def to_dense(self) -> nn.Conv2d:
        """An equal plain ``nn.Conv2d`` (zeros where nothing is stored)."""
        return self._filled(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                      self.padding, self.dilation, 1, self.bias is not None, self.padding_mode,
                                      dtype=self.values.dtype, device=self.values.device))

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return f"{text}, bias={self.bias is not None}, {self._stats_repr()}"
