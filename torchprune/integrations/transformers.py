"""`PrunerCallback`: a `tp.Pruner` inside Hugging Face transformers' ``Trainer.train()``.

>>> pruner = tp.Pruner(model, 0.9, tp.schedules.Cubic(begin=0, end=1000, every=100))
>>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[PrunerCallback(pruner)])
>>> trainer.train()                          # or trainer.train(resume_from_checkpoint=True)

* ``pruner.step()`` runs at ``on_optimizer_step``: right after each optimizer step and before the
  Trainer clears the gradients, so gradient and Taylor criteria read them (``on_step_end`` comes
  after ``zero_grad``). With gradient accumulation it steps once per optimizer step.
* Each checkpoint folder gets ``torchprune_pruner.pt`` (``pruner.state_dict()``) beside the model
  and optimizer; the masks themselves are buffers of the model, so the Trainer saves and loads them.
* When the Trainer resumes from a checkpoint, the Pruner's state is loaded from that folder before
  the first step, so the schedule goes on where it stopped. A checkpoint without the file (saved
  without this callback) is refused: the masks and the schedule would disagree.
* ``finalize=True`` makes the pruning permanent (`tp.Pruner.finalize`) when training ends.

Build the Pruner on the model before giving the model to the Trainer, and in a resumed run build
it with the same arguments (the masks' keys are then in the model's state_dict for the Trainer to
load).
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..pruner import Pruner

__all__ = ["PrunerCallback", "STATE_FILE"]

#: The Pruner's state in each checkpoint folder.
STATE_FILE = "torchprune_pruner.pt"


class PrunerCallback(TrainerCallback):
    """Steps ``pruner`` after every optimizer step, saves its state with every checkpoint and loads
    it back on resume; ``finalize=True`` finalizes it when training ends (see the module docstring)."""

    def __init__(self, pruner: Pruner, finalize: bool = False):
        if not isinstance(pruner, Pruner):
            raise TypeError(f"`pruner` must be a tp.Pruner, got {type(pruner).__name__}")
        if not isinstance(finalize, bool):
            raise TypeError(f"`finalize` must be a bool, got {type(finalize).__name__}")
        self.pruner = pruner
        self.finalize = finalize

    def on_train_begin(self, args, state, control, **kwargs):
        """On resume (the Trainer's step is past 0): loads the Pruner's state from that checkpoint."""
        if state.global_step == 0 or self.pruner.steps == state.global_step:
            return
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", STATE_FILE)
        if not os.path.isfile(path):
            raise RuntimeError(f"the Trainer resumes at step {state.global_step}, but {path} does not exist: the "
                               "checkpoint was saved without PrunerCallback, so the Pruner cannot resume with it")
        self.pruner.load_state_dict(torch.load(path, weights_only=False))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.step()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):  # only the process that wrote the checkpoint has it
            torch.save(self.pruner.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.finalize:
            self.pruner.finalize()
