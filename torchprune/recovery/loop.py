"""tp.recover(): win back what pruning cost by distilling the dense model into the pruned one.

The usual recipe for a pretrained model without labels (Sanh et al. 2020, Kurtic et al. 2022):
the dense model is the teacher, the pruned model the student, and the student learns to give the
teacher's outputs back on unlabeled inputs. With a `tp.Pruner` on the student the sparsity rises
along its schedule during the same loop (gradual pruning, optionally after a one-shot start such as
SparseGPT's); without one the masks stay as they are and only the surviving weights move. A
sparsified student (``tp.sparsify``) trains through the sparse kernels' backward in the same way.

    student = copy.deepcopy(teacher)
    tp.prune(student, 0.5, importance="sparsegpt", data=calibration)           # optional start
    pruner = tp.Pruner(student, 0.8, tp.schedules.Cubic(end=600, every=30, initial=0.5))
    tp.recover(student, teacher, batches, steps=1000, pruner=pruner, loss="embedding",
               checkpoint="recover.pt")

What one step does: the teacher's output under ``no_grad``, the student's, the loss (a kind of
`distillation_loss`, or your callable), ``backward``, the optimizer's step, the learning rate's
step, then ``pruner.step()``. The default optimizer is AdamW (no weight decay: it would shrink the
surviving weights towards the pruned ones) with a linear warm-up over the first 5% of the steps and
a cosine decay to a tenth of ``lr``. It is torch's fused AdamW when every trained parameter is a
floating-point CPU or CUDA tensor: on MiniLM's 22.7M parameters its step took 15 ms instead of
93 ms, about a sixth of a recovery step on 2 cores (`_adamw`).

A checkpoint (written every ``checkpoint_every`` steps and at the end, atomically) holds the
student's and the optimizer's state, the learning rate's, the Pruner's, the random states and the
position in ``data``; a later call with the same arguments and the same checkpoint path resumes from
it and ends where an uninterrupted run would have ended, bit for bit on the same CPU machine (the
saved random states are torch's CPU generator and Python's ``random``; CUDA generators are not).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..calibration import batches as split_batches
from ..calibration import call
from ..progress import progress_bar
from ..pruner import Pruner
from ..state import preserved_state
from .losses import KINDS, distillation_loss, output_tensor, token_mask
from .teacher import TeacherCache

__all__ = ["recover", "Recovery"]

_CHECKPOINT_VERSION = 1
WARMUP = 0.05  # of the steps, for the default optimizer's learning rate
FLOOR = 0.1  # the cosine decay ends at FLOOR * lr

LossFn = Callable[[Any, Any, Any], torch.Tensor]


@dataclass
class Recovery:
    """What `recover` did: ``history`` has one row per logged step (``step``, ``loss``, ``lr``,
    ``sparsity`` when a Pruner drives it, ``seconds`` since the call began); ``resumed_from`` is the
    step the checkpoint held (None: started afresh)."""

    steps: int
    history: List[Dict[str, float]] = field(default_factory=list)
    resumed_from: Optional[int] = None
    cache_bytes: int = 0
    seconds: float = 0.0

    @property
    def final_loss(self) -> Optional[float]:
        return self.history[-1]["loss"] if self.history else None


def _check_arguments(student, teacher, data, steps, pruner, loss, lr, checkpoint_every, log_every) -> None:
    for value, what in ((student, "student"), (teacher, "teacher")):
        if not isinstance(value, nn.Module):
            raise TypeError(f"`{what}` must be a torch.nn.Module, got {type(value).__name__}")
    if student is teacher or {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}:
        raise ValueError("`teacher` must be a separate model from `student`, sharing no parameter (keep a dense "
                         "copy: copy.deepcopy(model) before pruning)")
    if isinstance(data, Iterator) or not isinstance(data, Iterable):
        raise TypeError("`data` must be re-iterable (a list of batches or a DataLoader), got a one-pass "
                        f"iterator ({type(data).__name__}): recovery goes over it as many times as the steps need")
    for value, what in ((steps, "steps"), (checkpoint_every, "checkpoint_every"), (log_every, "log_every")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"`{what}` must be a positive int, got {value!r}")
    if pruner is not None:
        if not isinstance(pruner, Pruner):
            raise TypeError(f"`pruner` must be a tp.Pruner or None, got {type(pruner).__name__}")
        if pruner.model is not student and getattr(student, "module", None) is not pruner.model:
            raise ValueError("`pruner` must prune `student` (it was built on another model)")
        if getattr(pruner, "_finalized", False):
            raise ValueError("`pruner` was finalized and cannot step any more: build a new one")
    if not callable(loss) and loss not in KINDS:
        raise ValueError(f"`loss` must be one of {', '.join(map(repr, KINDS))} or a callable "
                         f"(student_output, teacher_output, inputs) -> scalar, got {loss!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise ValueError(f"`lr` must be a positive number, got {lr!r}")


def _check_options(pruner, layers, temperature, optimizer, train_mode) -> None:
    if isinstance(layers, str) or not all(isinstance(name, str) for name in layers):
        raise TypeError(f"`layers` must be a list of module names, got {layers!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if not isinstance(train_mode, bool):
        raise TypeError(f"`train_mode` must be a bool, got {type(train_mode).__name__}")
    criterion = getattr(pruner, "importance", None)
    if (not train_mode and getattr(criterion, "requires_data", False) and not getattr(criterion, "requires_loss", True)
            and getattr(pruner._strategy, "_data", None) is None):
        raise ValueError(f"`train_mode=False` with a Pruner scoring by {type(criterion).__name__}: it observes "
                         "forward passes made in train mode only, so it would see none (pass train_mode=True, or "
                         "give the Pruner `data`)")


def _check_cache(teacher_cache, data, loss) -> None:
    if not isinstance(teacher_cache, bool):
        raise TypeError(f"`teacher_cache` must be a bool, got {type(teacher_cache).__name__}")
    if teacher_cache and not isinstance(data, (list, tuple)):
        raise ValueError("`teacher_cache=True` needs `data` as a list or tuple of batches (the same batches in the "
                         f"same order every round), got {type(data).__name__}")
    if teacher_cache and callable(loss):
        raise ValueError("`teacher_cache=True` works with the built-in losses only: a `loss` callable is given the "
                         "teacher's whole output, which the cache does not keep")


def _warmup_cosine(steps: int) -> Callable[[int], float]:
    """The default learning-rate factor: linear warm-up over `WARMUP` of the steps, then a cosine
    decay from 1 to `FLOOR` at the last step."""
    warmup = max(1, round(WARMUP * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _Cycle:
    """The inputs of ``data``'s batches, round after round, with a position that a checkpoint can
    restore: the round, the batches taken in it, and torch's random state when the round began
    (a shuffling DataLoader draws its order from it, so the round is drawn again the same)."""

    def __init__(self, data: Iterable, model: nn.Module):
        self.data, self.model = data, model
        self.round, self.taken = 0, 0
        self.round_rng = torch.get_rng_state()
        self._iterator: Optional[Iterator] = None

    def _start(self, skip: int) -> None:
        current = _random_states()
        torch.set_rng_state(self.round_rng)
        self._iterator = split_batches(self.data, targets=False, model=self.model)
        for _ in range(skip):
            next(self._iterator)
        if skip:  # resumed: the states the checkpoint saved, not those the skipped batches left
            _set_random_states(current)

    def __next__(self):
        if self._iterator is None:
            self._start(self.taken)
        try:
            inputs, _ = next(self._iterator)
        except StopIteration:
            if self.taken == 0:
                raise ValueError("`data` yielded no batch") from None
            self.round, self.taken = self.round + 1, 0
            self.round_rng = torch.get_rng_state()
            self._start(0)
            inputs, _ = next(self._iterator)
        self.taken += 1
        return inputs

    def state(self) -> dict:
        return {"round": self.round, "taken": self.taken, "round_rng": self.round_rng}

    def load(self, state: dict) -> None:
        self.round, self.taken, self.round_rng = state["round"], state["taken"], state["round_rng"]
        self._iterator = None


def _check_layer_names(model: nn.Module, names: Sequence[str], argument: str) -> None:
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"`layers` names modules that `{argument}` does not have: {missing}")


class _LayerOutputs:
    """Forward hooks that keep the output tensor of each named module of a model (names checked
    by `_check_layer_names`), for the intermediate-layer terms of the loss."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        self.outputs: Dict[str, torch.Tensor] = {}
        self.handles = [modules[name].register_forward_hook(self._keeper(name)) for name in names]

    def _keeper(self, name: str):
        def keep(module, inputs, output):
            self.outputs[name] = output_tensor(output)
        return keep

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _positions_match(mask: Optional[torch.Tensor], tensor: torch.Tensor) -> bool:
    return mask is not None and tensor.dim() == mask.dim() + 1 and tuple(tensor.shape[:-1]) == tuple(mask.shape)


def _random_states() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])


def _save(path: str, state: dict) -> None:
    """Writes ``state`` to ``path`` through a temporary file, so an interrupted write never leaves a
    broken checkpoint in its place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = path + ".partial"
    torch.save(state, temporary)
    os.replace(temporary, path)


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable,
    steps: int,
    pruner: Optional[Pruner] = None,
    loss: Union[str, LossFn] = "cosine",
    output: Optional[str] = None,
    layers: Sequence[str] = (),
    temperature: float = 2.0,
    optimizer: Optional[torch.optim.Optimizer] = None,
    lr: float = 1e-4,
    train_mode: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    log_every: int = 10,
    teacher_cache: bool = False,
) -> Recovery:
    """Trains ``student`` for ``steps`` steps to give ``teacher``'s outputs on ``data``; returns a `Recovery`.

    ``data``: a re-iterable of input batches (tensors, tuples, dicts called as ``model(**batch)``,
    `tp.Inputs`, or (inputs, targets) pairs whose targets are ignored), gone over as often as the
    steps need. ``pruner``: a `tp.Pruner` on ``student``, stepped after each optimizer step.
    ``loss``: a kind of `tp.recovery.distillation_loss` ("cosine", "mse", "kl" at ``temperature``,
    "embedding") on the tensor ``output`` names (default: ``last_hidden_state``, else ``logits``, else
    the output), over the tokens of the batch's ``attention_mask``; or a callable
    ``loss(student_output, teacher_output, inputs)``. ``layers``: names of modules (the same in
    both models) whose outputs add a normalized-MSE term each, e.g. every encoder block.

    ``optimizer`` (built on ``student``'s parameters) replaces the default AdamW at ``lr`` with its
    warm-up and cosine decay; it then keeps its own learning rate. ``train_mode=False`` runs the
    student in eval mode (no dropout, BatchNorm statistics frozen). Both models get their train/eval
    flags back at the end; the teacher is never changed.

    ``teacher_cache``: keep the teacher's targets of each batch from the first round over ``data``
    (a list or tuple, read in the same order every round) and reuse them, in bfloat16
    (`tp.recovery.teacher`): the teacher runs once per batch instead of once per step, for memory
    that grows with the data's tokens. Built-in losses only.

    ``checkpoint``: a file path; it is written every ``checkpoint_every`` steps and at the end, and
    when it exists at the call the run resumes from it (ValueError if it was written with other
    steps, loss, output, layers, temperature, lr, train_mode or Pruner). ``progress`` shows a tqdm
    bar when tqdm is installed.

    Long because the signature and this docstring cover sixteen arguments; the body is the loop.
    """
    _check_arguments(student, teacher, data, steps, pruner, loss, lr, checkpoint_every, log_every)
    _check_options(pruner, layers, temperature, optimizer, train_mode)
    _check_cache(teacher_cache, data, loss)
    layers = list(layers)
    for model, argument in ((student, "student"), (teacher, "teacher")):
        _check_layer_names(model, layers, argument)
    settings = {"loss": loss if isinstance(loss, str) else getattr(loss, "__qualname__", type(loss).__name__),
                "output": output, "layers": layers, "temperature": float(temperature), "lr": float(lr),
                "train_mode": train_mode, "teacher_cache": teacher_cache}  # a resumed run must be the same run
    run = _Run(student, teacher, pruner, optimizer, lr, steps, _Loss(loss, output, temperature, layers), settings)
    cycle = _Cycle(data, student)
    result = Recovery(steps=steps)
    path = None if checkpoint is None else os.fspath(checkpoint)
    start = 0
    if path is not None and os.path.exists(path):
        start = result.resumed_from = _resume(path, steps, run, cycle)
    began = time.perf_counter()
    bar = progress_bar(steps, "recover", initial=start) if progress else None
    try:
        with preserved_state(teacher), preserved_state(student), run.hooked():
            teacher.eval()
            student.train(train_mode)
            for step in range(start, steps):
                value = run.step(next(cycle), step, cycle.taken - 1)
                done = step + 1
                if done % log_every == 0 or done == steps:
                    result.history.append(run.row(done, value, time.perf_counter() - began))
                    _show(bar, result.history[-1])
                if bar is not None:
                    bar.update(1)
                if path is not None and (done % checkpoint_every == 0 or done == steps):
                    _save(path, _checkpoint_state(steps, done, run, cycle))
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - began
    result.cache_bytes = 0 if run.cache is None else run.cache.nbytes
    return result


class _Loss:
    """The loss of one step: the chosen kind (or callable) on the outputs, plus one normalized MSE
    per intermediate layer, read by forward hooks (`hooked`) on both models."""

    def __init__(self, loss, output, temperature, layers):
        self.loss, self.output, self.temperature, self.layers = loss, output, temperature, layers
        self.student_layers: Optional[_LayerOutputs] = None
        self.teacher_layers: Optional[_LayerOutputs] = None

    def __call__(self, student_out, teacher_out, inputs, teacher_layers: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of ``student_out`` against ``teacher_out`` (`target`'s: the teacher's whole
        output for a callable loss, else the tensor it distils) and of the student's intermediate
        layers against ``teacher_layers``."""
        mask = token_mask(inputs)
        if callable(self.loss):
            value = self.loss(student_out, teacher_out, inputs)
        else:
            value = distillation_loss(output_tensor(student_out, self.output), teacher_out, self.loss, mask,
                                      self.temperature)
        for name in self.layers:  # normalized MSE of each intermediate output, over the kept tokens
            ours, theirs = self.student_layers.outputs[name], teacher_layers[name]
            value = value + distillation_loss(ours, theirs, "mse", mask if _positions_match(mask, ours) else None)
        return value

    def target(self, teacher_out):
        """What the loss compares the student with: the teacher's whole output for a callable loss,
        else the tensor ``output`` names (what a `TeacherCache` keeps)."""
        return teacher_out if callable(self.loss) else output_tensor(teacher_out, self.output)


def _adamw(parameters: List[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay; the fused kernel (one pass over all tensors) where it exists
    for every parameter, the default loop elsewhere."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, fused=fused or None)


class _Run:
    """The objects one recovery updates (student, optimizer, learning-rate schedule, Pruner) and one
    training step on them."""

    def __init__(self, student, teacher, pruner, optimizer, lr, steps, loss: _Loss, settings: dict):
        self.student, self.teacher, self.pruner, self.loss, self.settings = student, teacher, pruner, loss, settings
        self.scheduler = None
        self.cache = TeacherCache() if settings["teacher_cache"] else None
        if optimizer is None:
            parameters = [p for p in student.parameters() if p.requires_grad]
            if not parameters:
                raise ValueError("`student` has no parameter that requires grad: nothing to recover")
            optimizer = _adamw(parameters, lr)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
        self.optimizer = optimizer

    @contextlib.contextmanager
    def hooked(self):
        """The intermediate layers' hooks on both models while the loop runs."""
        self.loss.student_layers = _LayerOutputs(self.student, self.loss.layers)
        self.loss.teacher_layers = _LayerOutputs(self.teacher, self.loss.layers)
        try:
            yield
        finally:
            self.loss.student_layers.remove()
            self.loss.teacher_layers.remove()

    def targets(self, inputs, position: int):
        """The loss's target on ``inputs`` (the batch at ``position`` in its round: `_Loss.target`)
        and the teacher's intermediate layers' outputs: computed, or from the cache."""
        def compute():
            with torch.no_grad():
                teacher_out = call(self.teacher, inputs)
            return self.loss.target(teacher_out), dict(self.loss.teacher_layers.outputs)

        return compute() if self.cache is None else self.cache.targets(position, compute)

    def step(self, inputs, step: int, position: int) -> torch.Tensor:
        """One step on ``inputs``: the loss, backward, the optimizer's and the schedules' steps."""
        teacher_out, teacher_layers = self.targets(inputs, position)
        value = self.loss(call(self.student, inputs), teacher_out, inputs, teacher_layers)
        if not torch.isfinite(value):
            raise FloatingPointError(f"the distillation loss is {float(value.detach())} at step {step}: lower `lr`")
        value.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.pruner is not None:
            self.pruner.step()  # before zero_grad: gradient criteria read this step's .grad
        self.optimizer.zero_grad(set_to_none=True)
        return value.detach()

    def row(self, done: int, value: torch.Tensor, seconds: float) -> Dict[str, float]:
        row = {"step": done, "loss": float(value), "lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds}
        if self.pruner is not None:
            row["sparsity"] = self.pruner.sparsity
        return row


def _checkpoint_state(steps: int, done: int, run: _Run, cycle: _Cycle) -> dict:
    return {"format": "torchprune.recover", "version": _CHECKPOINT_VERSION, "steps": steps, "done": done,
            "student": run.student.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": None if run.scheduler is None else run.scheduler.state_dict(),
            "pruner": None if run.pruner is None else run.pruner.state_dict(),
            "data": cycle.state(), "random": _random_states(), "settings": run.settings}


def _resume(path: str, steps: int, run: _Run, cycle: _Cycle) -> int:
    """Loads the checkpoint at ``path`` into the run's objects; the number of steps it had done. The
    checkpoint's own fields and settings are checked before anything is loaded; if the student,
    optimizer or Pruner refuses its part, the student is put back as it was."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # not a torch file at all: the same answer as a torch file of another kind
        raise ValueError(f"`checkpoint` {path!r} is not a tp.recover checkpoint ({type(error).__name__})") from error
    if not isinstance(state, dict) or state.get("format") != "torchprune.recover":
        raise ValueError(f"`checkpoint` {path!r} is not a tp.recover checkpoint")
    if state["steps"] != steps:
        raise ValueError(f"`checkpoint` {path!r} belongs to a run of {state['steps']} steps, this call asks for "
                         f"{steps}: the learning-rate schedule depends on it (pass the same steps, or another path)")
    if (state["pruner"] is None) != (run.pruner is None):
        raise ValueError(f"`checkpoint` {path!r} was written {'with' if run.pruner is None else 'without'} a `pruner`; "
                         "pass the same arguments as the run that wrote it")
    if (state["scheduler"] is None) != (run.scheduler is None):
        raise ValueError(f"`checkpoint` {path!r} was written with {'the default' if run.scheduler is None else 'your'} "
                         "optimizer; pass the same arguments as the run that wrote it")
    for key, value in run.settings.items():
        if state["settings"].get(key) != value:
            raise ValueError(f"`checkpoint` {path!r} was written with {key}={state['settings'].get(key)!r}, this call "
                             f"has {key}={value!r}: pass the same arguments, or another path to start afresh")
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    try:
        run.student.load_state_dict(state["student"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scheduler is not None:
            run.scheduler.load_state_dict(state["scheduler"])
        if run.pruner is not None:
            run.pruner.load_state_dict(state["pruner"])
    except Exception:  # a checkpoint of another model or Pruner: the student goes back as it was
        run.student.load_state_dict(before)
        raise
    cycle.load(state["data"])
    _set_random_states(state["random"])
    return int(state["done"])


def _show(bar, row: dict) -> None:
    if bar is not None:
        shown = {"loss": f"{row['loss']:.4f}"}
        if "sparsity" in row:
            shown["sparsity"] = f"{row['sparsity']:.3f}"
        bar.set_postfix(shown)
