"""Dependency tracing: labelling which channels of which tensors must be removed together.

* labels.py: `Labels`, the ids, unifications, freezes and checks behind every trace;
* rules.py: how each module and op moves labels (layer modules through the table of
  torchprune/layer_types.py);
* recorder.py: `LabelRecorder`, which rule one call (a torch function or Tensor method) goes through;
* record.py: labelling one recorded run of the model on the example inputs (the usual path);
* fx.py: `trace`, which records a run, or labels torch.fx's symbolic trace where a layer did not run.
"""
