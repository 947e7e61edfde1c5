"""What pruning did to a model, and what it would do: the numbers and pictures read off a model.

* model_summary.py: ``tp.summary`` (params, nonzeros, sparsity and MACs per layer) and
  ``tp.sparsity`` (one number over the prunable layers);
* sensitivity.py: ``tp.sensitivity`` (each layer pruned alone, the metric recorded) and
  ``tp.allocate`` (per-layer sparsities from those curves);
* report.py: the plots and Markdown sections the demo assembles into a report.

Nothing here changes how a model is pruned: these read the masked and sparse layers of
``torchprune.nn`` and, for sensitivity, call ``tp.prune`` and restore every layer afterwards.
"""

from .model_summary import Summary, sparsity, summary

__all__ = ["Summary", "summary", "sparsity"]
