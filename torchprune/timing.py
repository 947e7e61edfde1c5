"""Wall-clock timing of candidates that compete: warm-up, interleaved calls, medians, device sync.

``tp.sparsify`` (is the sparse layer faster than the dense one, here, on these shapes?), the
report's latency table and the benchmark scripts all time code the same way, from here:

* a warm-up call of each candidate first (first-call allocations, caches, lazy initialisation);
* then round-robin (a, b, a, b, ...), so that drift on a shared machine hits every candidate alike;
* the median of the samples, which drops the outliers such drift causes;
* optionally several rounds of that (`time_rounds`): on a 2-core machine the median ratio of one
  round of 20 calls can differ from the next round's by 5-10% (drift slower than a round), so a
  ratio worth reporting is the median over rounds, shown with its spread;
* with ``device`` on CUDA, a synchronize after each call, so that the host clock sees the queued
  GPU work (CUDA runs asynchronously); on the CPU that is a no-op.

A leaf module (torch only), so that anything, benchmarks included, may import it.

>>> seconds = time_interleaved({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, repeats=20)
>>> seconds["sparse"] < seconds["dense"]
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional

import torch

__all__ = ["synchronize", "warm_up", "sample_interleaved", "medians", "time_interleaved", "time_rounds"]

Runners = Mapping[str, Callable[[], object]]


def synchronize(device: Optional[torch.device]) -> None:
    """Waits for the device's queued work (CUDA runs asynchronously), so host timers see it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(runners: Runners, calls: int = 1, device: Optional[torch.device] = None) -> float:
    """Calls each runner ``calls`` times in turn (a, a, b, b, ...); returns the seconds that took,
    from a drained device queue to a drained one (a caller may size its repeats from it)."""
    synchronize(device)
    start = time.perf_counter()
    for run in runners.values():
        for _ in range(calls):
            run()
    synchronize(device)
    return time.perf_counter() - start


def sample_interleaved(runners: Runners, repeats: int, device: Optional[torch.device] = None,
                       settle: int = 0) -> Dict[str, List[float]]:
    """``repeats`` samples of the seconds per call of each runner, taken round-robin (no warm-up).

    With ``settle`` > 0 each sample is timed after that many untimed calls of the same runner, so
    that a whole model is timed as it runs when deployed alone, not right after another model. On
    an Intel Xeon (family 6 model 167) the call right after a switch between models was slower:
    the digits MLP at 450 rows took 417 us back to back and about 450 us right after a sparse
    model, and of four identical sparse copies timed round-robin with dense, the one called right
    after dense measured 0.47 of dense, the others 0.44. Layers inside a model do run right after
    other work, so layer timings keep settle=0.
    """
    if isinstance(settle, bool) or not isinstance(settle, int) or settle < 0:
        raise ValueError(f"`settle` must be a non-negative int, got {settle!r}")
    times: Dict[str, List[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            for _ in range(settle):
                run()
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def medians(samples: Mapping[str, List[float]]) -> Dict[str, float]:
    """The median of each runner's samples."""
    return {name: statistics.median(values) for name, values in samples.items()}


def time_interleaved(runners: Runners, repeats: int, warmup: int = 2,
                     device: Optional[torch.device] = None, settle: int = 0) -> Dict[str, float]:
    """Median seconds per call of each runner, measured round-robin after ``warmup`` calls of each
    (``settle``: see `sample_interleaved`)."""
    return time_rounds(runners, repeats, 1, warmup, device, settle)[0]


def time_rounds(runners: Runners, repeats: int, rounds: int, warmup: int = 2,
                device: Optional[torch.device] = None, settle: int = 0) -> List[Dict[str, float]]:
    """``rounds`` rounds of ``repeats`` round-robin calls each, after ``warmup`` calls of each
    runner: the median seconds per call of each runner, one dict per round (``settle``: see
    `sample_interleaved`)."""
    if rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    warm_up(runners, warmup, device)
    return [medians(sample_interleaved(runners, repeats, device, settle)) for _ in range(rounds)]
