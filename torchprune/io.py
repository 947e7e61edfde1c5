"""save() / load() of pruned models as plain tensors, loadable with ``weights_only=True``.

The file is a dict of tensors and plain data: the model's state_dict (masks included, as the
``<layer>.weight_mask`` buffers), its metadata (each module's state_dict ``version``, which
BatchNorm and models such as torchvision's MNASNet read when loading) and the names of the masked
layers. Loading replays the masking on a fresh, unpruned instance of the same class and then loads
the state_dict strictly, with its metadata, so no module is ever pickled and the file loads in any
process that can build the model. Files written before the metadata was kept load without it, as
they always did.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Dict, Union

import torch
from torch import nn

from ._version import __version__
from .masking import attach_mask, base_type, check_supported, get_mask, is_prunable
from .structured.replay import replay, structure_of

__all__ = ["save", "load"]

_FORMAT = "torchprune"
_FORMAT_VERSION = 1
_STRUCTURE_VERSION = 2  # files of structurally pruned models: the removal steps in "structure"


def save(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Writes ``model``'s weights and pruning masks to ``path``.

    >>> tp.save(model, "pruned.pt")
    >>> fresh = tp.load("pruned.pt", MyNet())     # comes back pruned, same outputs
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    masked = {name: base_type(m).__name__ for name, m in model.named_modules() if get_mask(m) is not None}
    state = model.state_dict()
    structure = structure_of(model)  # channels removed by structural pruning, replayed by load()
    payload = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION if not structure else _STRUCTURE_VERSION,
        "structure": structure,
        "torchprune_version": __version__,
        "masked_layers": masked,
        "state_dict": {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()},
        "metadata": _plain_metadata(state),
    }
    torch.save(payload, path)


#: The types a state_dict metadata value may have in the file (so it loads with ``weights_only=True``).
_PLAIN = (bool, int, float, str, type(None))


def _plain_metadata(state) -> Dict[str, Dict[str, object]]:
    """``state._metadata`` ({module prefix: {"version": n, ...}}) as plain dicts of plain values."""
    metadata = getattr(state, "_metadata", None) or {}
    return {str(prefix): {str(k): v for k, v in entries.items() if isinstance(v, _PLAIN)}
            for prefix, entries in metadata.items() if isinstance(entries, dict)}


def _with_metadata(state: Dict[str, torch.Tensor], metadata) -> Dict[str, torch.Tensor]:
    """``state`` as `load_state_dict` takes it with metadata: an OrderedDict with ``_metadata``.
    A file without metadata (written before it was kept) gives ``state`` as it is."""
    if metadata is None:
        return state
    state = OrderedDict(state)
    state._metadata = OrderedDict((prefix, dict(entries)) for prefix, entries in metadata.items())
    return state


def load(path: Union[str, os.PathLike], model: nn.Module) -> nn.Module:
    """Restores the pruned weights and masks saved by `save` into ``model``; returns ``model``.
    The state_dict is loaded with the metadata it was saved with (each module's ``version``).

    ``model`` is a fresh instance of the saved model's class; for a file of a model pruned with
    masks only, it may also be one already pruned the same way. A file of a structurally pruned
    model replays its removal steps, so it needs an unpruned instance. Everything is checked
    against the file before the model is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # missing file, no permission: torch's own error says it best
        raise
    except Exception as error:  # any other failure to read it means it is not our format
        raise ValueError(f"`path` {str(path)!r} is not a torchprune file (written by tp.save): {error}") from error
    if (
        not isinstance(payload, dict)
        or payload.get("format") != _FORMAT
        or not isinstance(payload.get("masked_layers"), dict)
        or not isinstance(payload.get("state_dict"), dict)
        or not isinstance(payload.get("metadata", {}), dict)
        or not all(isinstance(entries, dict) for entries in payload.get("metadata", {}).values())
    ):
        raise ValueError(f"`path` {str(path)!r} is not a torchprune file (written by tp.save)")
    if payload.get("format_version", 0) > _STRUCTURE_VERSION:
        raise ValueError(
            f"`path` {str(path)!r} was written by torchprune {payload.get('torchprune_version')} in format "
            f"{payload['format_version']}; this torchprune reads format {_STRUCTURE_VERSION} or older"
        )
    masked: Dict[str, str] = payload["masked_layers"]
    state: Dict[str, torch.Tensor] = payload["state_dict"]
    structure = payload.get("structure", [])
    target = replay(copy.deepcopy(model), structure) if structure else model  # checked before `model` changes
    modules = dict(target.named_modules(remove_duplicate=False))
    for name, kind in masked.items():
        module = modules.get(name)
        if module is None or not is_prunable(module) or base_type(module).__name__ != kind:
            found = "nothing" if module is None else type(module).__name__
            raise ValueError(f"`model` does not match the file: the file masks a {kind} at {name!r}, "
                             f"the model has {found} there")
    _check_state_matches(target, masked, state)
    check_supported({name: modules[name] for name in masked})  # on the checked copy: model unchanged
    if structure:
        replay(model, structure)
        modules = dict(model.named_modules(remove_duplicate=False))

    shared: Dict[int, torch.Tensor] = {}  # layers tied to one weight get one mask object, as prune() gives
    for name in masked:
        module = modules[name]
        mask = shared.get(id(module.weight))
        if mask is None:
            attach_mask(module, state[f"{name}.weight_mask" if name else "weight_mask"])
            shared[id(module.weight)] = module.weight_mask
        elif get_mask(module) is not mask:
            attach_mask(module, mask, copy=False)
    model.load_state_dict(_with_metadata(state, payload.get("metadata")), strict=True)
    return model


def _shape(value) -> tuple:
    """A state_dict entry's shape; () for extra state that is not a tensor (only its key is checked)."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _check_state_matches(model: nn.Module, masked: Dict[str, str], state: Dict[str, torch.Tensor]) -> None:
    """The file's tensors must be exactly the model's (plus the saved masks), with the same shapes."""
    expected = {k: _shape(v) for k, v in model.state_dict().items()}
    every_name = dict(model.named_modules(remove_duplicate=False))
    masked_ids = {id(every_name[name]) for name in masked}
    for name, module in every_name.items():  # aliases too: state_dict lists a mask under each name
        key = f"{name}.weight_mask" if name else "weight_mask"
        if id(module) in masked_ids:
            expected[key] = tuple(module.weight.shape)
        elif get_mask(module) is not None:
            raise ValueError(f"`model` layer {name!r} is pruned but the file has no mask for it; "
                             "load into a fresh model")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if _shape(state[k]) != expected[k])
    if missing or unexpected or wrong:
        where = _layers_of(every_name, missing + unexpected + wrong)
        parts = []
        if missing:
            parts.append(f"missing in the file: {missing[:5]}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:5]}")
        if wrong:
            parts.append("shape differs: "
                         + ", ".join(f"{k} {list(_shape(state[k]))} vs {list(expected[k])}" for k in wrong[:5]))
        raise ValueError(f"`model` does not match the file at {where}; nothing was changed (" + "; ".join(parts)
                         + "; sizes are the file's vs the model's)")


def _layers_of(modules: Dict[str, nn.Module], keys) -> str:
    """The modules that hold the state_dict ``keys``, named with their types, for error messages."""
    names = []
    for key in keys:
        owner = key.rpartition(".")[0]
        while owner and owner not in modules:
            owner = owner.rpartition(".")[0]
        module = modules.get(owner)
        label = f"{owner or '<model>'!r} ({type(module).__name__ if module is not None else 'absent'})"
        if label not in names:
            names.append(label)
    return ("layer " if len(names) == 1 else "layers ") + ", ".join(names[:5])
