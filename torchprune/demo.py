"""The demo: train an MLP on real handwritten digits, prune it, fine-tune it, and show the summary.

It is the README's first command (``python -m torchprune demo``) and the smallest complete use of
the library: train dense, `prune()` to a global sparsity, fine-tune with the masks held by the
optimizer hook, then `summary()`. Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import time
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import data as digits
from .analysis import summary
from .masking import make_permanent, sparsity
from .pruner import prune


def make_mlp() -> nn.Sequential:
    """LeNet-300-100 sized for 8x8 digits: 64-300-100-10."""
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, label: str) -> None:
    """Adam with mini-batches of 64; shows a progress bar when tqdm is installed."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    epochs_iter = range(epochs)
    try:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc=label, leave=False)
    except ImportError:
        pass
    for _ in epochs_iter:
        for xb, yb in digits.batches(x, y, batch_size=64, shuffle=True, generator=generator):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100


def run(seed: int = 0, target: float = 0.9, epochs: int = 30, finetune_epochs: int = 10) -> Tuple[float, float, float]:
    """Runs the demo and prints what it does; returns (dense, pruned, fine-tuned) test accuracy in %."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits.load_digits(seed=seed)
    print(f"digits: {len(x_train)} training and {len(x_test)} test images (8x8, scikit-learn's bundled set)")
    start = time.perf_counter()

    model = make_mlp()
    train(model, x_train, y_train, epochs, 1e-3, seed, "dense training")
    dense = accuracy(model, x_test, y_test)
    print(f"dense MLP 64-300-100-10: test accuracy {dense:.2f}%")

    prune(model, sparsity=target, scope="global", importance="magnitude")
    pruned = accuracy(model, x_test, y_test)
    print(f"pruned to {sparsity(model):.1%} (global magnitude, one shot): test accuracy {pruned:.2f}%")

    train(model, x_train, y_train, finetune_epochs, 5e-4, seed + 1, "fine-tuning")
    finetuned = accuracy(model, x_test, y_test)
    print(f"after {finetune_epochs} epochs of fine-tuning: test accuracy {finetuned:.2f}% at sparsity {sparsity(model):.1%}")

    print()
    print(summary(model, example_inputs=x_test[:1]))
    make_permanent(model)
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return dense, pruned, finetuned


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="global sparsity target in [0, 1) (default 0.9)")
    parser.add_argument("--epochs", type=int, default=30, help="dense training epochs (default 30)")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
