"""What every part of the demo shares: its settings, the two models, training and testing, the
progressive schedule, and the result records that the runs fill in and the write-up reads.

Kept apart from the runs (`weights`, `channels`) so that both import it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pruner import Pruner
from ..schedules import Cubic
from .digits import batches

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
# epochs: dense training, and the budget after pruning (fine-tuning, or the progressive run)
FULL = {"mlp": (30, 15), "cnn": (20, 10)}
QUICK = {"mlp": (8, 4), "cnn": (4, 2)}
BATCH = 64
# Adam's learning rate for dense training and for every method after pruning (fine-tuning, the
# progressive runs). 1e-3 after pruning was chosen over 5e-4 (and over cosine decay, and over a
# cubic ramp ending at half the budget) on validation accuracy: 20% of each seed's training images
# held out, seeds 0-2, the test images unused; it won for the MLP at 90% and for the CNN.
LR = 1e-3
#: The weight-level methods, in the order of the tables and of results.json.
METHODS = ("one-shot", "one-shot + fine-tune", "progressive")

#: The digits split as `digits.load_digits` returns it: (x_train, y_train, x_test, y_test).
Split = Tuple[Tensor, Tensor, Tensor, Tensor]


def make_mlp() -> nn.Sequential:
    """LeNet-300-100 sized for 8x8 digits: 64-300-100-10."""
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def make_cnn() -> nn.Sequential:
    """Two 3x3 convolutions (16, 32 filters), a 2x2 max-pool and a 512-64-10 classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def progress_bar(iterable: Iterable, label: str, leave: bool = False, total: Optional[int] = None) -> Iterable:
    """A tqdm bar over ``iterable`` when tqdm is installed (the demo extra), else ``iterable`` itself."""
    try:
        from tqdm.auto import tqdm  # optional dependency: imported only when a bar is wanted
    except ImportError:
        return iterable
    return tqdm(iterable, desc=label, leave=leave, total=total)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, label: str,
          pruner: Optional[Pruner] = None) -> None:
    """Adam on mini-batches of 64 in a seeded order; ``pruner.step()`` after each optimizer step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in progress_bar(range(epochs), label):
        model.train()
        for xb, yb in batches(x, y, batch_size=BATCH, shuffle=True, generator=generator):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            if pruner is not None:
                pruner.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in percent."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100


def progressive_schedule(x_train: torch.Tensor, epochs: int, target: float) -> Cubic:
    """Cubic from the first step to two thirds of the run, a mask update every half epoch; the
    last third trains at the final sparsity."""
    steps_per_epoch = -(-len(x_train) // BATCH)
    end = max(1, (2 * epochs * steps_per_epoch) // 3)
    return Cubic(begin=0, end=end, every=max(1, steps_per_epoch // 2), final=target)


@dataclass
class Sweep:
    """One architecture's weight-level run (`weights.sweep`).

    ``accuracy[method][sparsity]`` is the test accuracy in percent for each of `METHODS`; ``models`` holds
    ``"dense"`` and the pruned model of each ``(method, sparsity)`` but "one-shot" (which is fine-tuned in
    place); ``schedules[sparsity]`` is the progressive run's schedule.
    """

    dense: float
    accuracy: Dict[str, Dict[float, float]] = field(default_factory=lambda: {method: {} for method in METHODS})
    models: Dict[object, nn.Module] = field(default_factory=dict)
    schedules: Dict[float, Cubic] = field(default_factory=dict)


@dataclass
class Wanda:
    """The dense MLP pruned once by Wanda (95% per row): test accuracy before and after fine-tuning."""

    before: float
    after: float
    model: nn.Module


@dataclass
class DemoResult:
    """Everything the demo measured, as the write-up reads it.

    ``flat`` is the digits split with 64 pixels per row (the MLP's input), ``images`` the same split as
    (N, 1, 8, 8) images (the CNN's); ``channels`` is `channels.run`'s dict, ``adaptive`` and ``rigl``
    are `adaptive.adaptive`'s and `adaptive.rigl`'s.
    """

    seed: int
    quick: bool
    epochs: Dict[str, Tuple[int, int]]
    flat: Split
    images: Split
    mlp: Sweep
    cnn: Sweep
    channels: Dict
    wanda: Wanda
    adaptive: Dict
    rigl: Dict

    @property
    def mean_image(self) -> Tensor:
        """The mean training image, flattened: which pixels are nearly blank."""
        return self.flat[0].mean(0)

    @property
    def repeats(self) -> int:
        """Timing repeats per model in the latency tables."""
        return 20 if self.quick else 100
