"""The module path ``torchprune.sensitivity`` (0.2 promised that ``from torchprune.sensitivity import
...`` keeps working, and `Sensitivity` results pickled by 0.3 name it). The code lives in
torchprune/analysis/sensitivity.py."""

from .analysis.sensitivity import DEFAULT_SPARSITIES, Sensitivity, allocate, sensitivity

__all__ = ["Sensitivity", "sensitivity", "allocate", "DEFAULT_SPARSITIES"]
