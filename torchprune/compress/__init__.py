"""``python -m torchprune compress``: prune, recover by distillation, sparsify and measure a
pretrained model in one command (command.py), on text that ships with Python or the user's own.

models.py loads and saves the model, workload.py builds the batches and measures quality,
latency.py times dense against sparse (by default in a fresh process on the saved model), report.py
writes report.md and its plot.
"""
