"""The compress command's latency: the dense model against the sparsified pruned one, interleaved.

`time_dense_and_sparse` times two models in this process. The command itself calls `time_saved`
(unless ``--time-in-process``): it runs the same timing in a fresh Python process that loads the
dense model and the saved pruned one (``model.pt``, by `tp.load` into a fresh dense copy, as a
deployment loads it), the way pyperf runs every benchmark in worker processes.

Why a fresh process: after a long recovery, the command's own process ran both models slower than
a fresh process did, the sparse one more. all-MiniLM-L6-v2 at 90%, 1 x 128 tokens, Intel Xeon
(family 6 model 167), 2 threads, after 26 minutes of recovery: dense 16.5-16.6 ms and sparse
8.3-8.4 ms in the command's process (1.98x), 15.6-15.9 and 7.5-7.9 ms for the same saved model in
a fresh process (2.07x); an earlier run's report said 1.94x where a fresh process then measured
2.04-2.06x; after a 2-minute recovery the command's process timed 2.03x. The cause, sampled with
perf: glibc's ``_int_malloc`` took 5.0% of the sparse model's samples in the command's process
against 0.5% in a fresh one (3.3% against 0.3% for the dense model), while the second thread
waited. Recovery allocates tensors of every batch's length for half an hour; the likely reason is
the free lists this leaves in the heap, which every activation the timed models allocate then
searches. Returning freed memory to the system (malloc_trim) did not help. A fresh process starts
with a clean heap, as a deployment does.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict

import torch
from torch import nn

from ..calibration import call
from ..masking import masks
from ..nn.sparse import SparseLayer
from ..sparsify import sparsify
from ..timing import time_rounds
from .models import Loaded, load_model, reload_model
from .workload import max_abs_diff, positional

__all__ = ["time_dense_and_sparse", "time_saved", "prefer_to_be_killed"]


def time_dense_and_sparse(dense: nn.Module, pruned: nn.Module, inputs, repeats: int,
                          rounds: int = 1) -> Dict[str, object]:
    """Dense against ``tp.sparsify(pruned)`` timed at ``inputs`` in inference mode: ``rounds`` rounds
    of ``repeats`` interleaved calls. The milliseconds are medians over every round's medians, the
    speedup the median of the rounds' speedups (each compares the two models timed together), and
    ``speedups`` lists them all, so the report can show the spread."""
    sparse = sparsify(pruned, example_inputs=positional(inputs))
    layers = len(masks(pruned))
    swapped = sum(1 for m in sparse.modules() if isinstance(m, SparseLayer))
    with torch.inference_mode():
        found = time_rounds({"dense": lambda: call(dense, inputs), "sparse": lambda: call(sparse, inputs)},
                            repeats, rounds)
    speedups = [one["dense"] / one["sparse"] for one in found]
    return {"dense_ms": 1e3 * statistics.median(one["dense"] for one in found),
            "sparse_ms": 1e3 * statistics.median(one["sparse"] for one in found),
            "speedup": statistics.median(speedups), "speedups": speedups, "layers": layers, "swapped": swapped,
            "max_abs_diff": max_abs_diff(pruned, sparse, inputs)}


def time_saved(loaded: Loaded, saved: str, shapes: Dict[str, Any], repeats: int,
               rounds: int = 1) -> Dict[str, Dict[str, object]]:
    """`time_dense_and_sparse` at each of ``shapes`` (name -> inputs), run in a fresh Python process
    on the model at ``loaded.source`` and the pruned model `save_model` wrote to ``saved``, with this
    process's number of torch threads. RuntimeError, with the child's error output, when it fails or
    cannot start."""
    with tempfile.TemporaryDirectory(prefix="torchprune-latency-") as folder:
        spec, result = os.path.join(folder, "spec.pt"), os.path.join(folder, "result.json")
        torch.save({"model": loaded.source, "saved": saved, "shapes": dict(shapes), "repeats": repeats,
                    "rounds": rounds, "threads": torch.get_num_threads()}, spec)
        # the child sees this process's import path: the model file may pickle classes found through it
        path = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
        try:
            done = subprocess.run([sys.executable, "-m", __name__, spec, result], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": path})
        except OSError as error:  # no process to start (out of memory, say)
            raise RuntimeError(f"timing the saved model {saved!r} in a fresh process failed to start: "
                               f"{error}") from error
        if done.returncode != 0:
            raise RuntimeError(f"timing the saved model {saved!r} in a fresh process failed (exit code "
                               f"{done.returncode}):\n{done.stderr[-4000:]}")
        with open(result) as handle:
            return json.load(handle)


def prefer_to_be_killed() -> bool:
    """Asks Linux to pick this process first if memory runs out (``oom_score_adj`` 1000): the fresh
    process holds a second copy of both models beside the command's, and when the two do not fit,
    losing the timing (the command then times in its own process) is better than losing the
    command's half hour of recovery. False where the setting cannot be written (not Linux)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
        return True
    except OSError:
        return False


def _main(spec_path: str, result_path: str) -> None:
    """The fresh process of `time_saved`: loads both models, times them, writes the JSON result."""
    prefer_to_be_killed()
    spec = torch.load(spec_path, map_location="cpu", weights_only=False)
    torch.set_num_threads(spec["threads"])
    loaded = load_model(spec["model"])
    pruned = reload_model(loaded, spec["saved"])
    timings = {shape: time_dense_and_sparse(loaded.model, pruned, inputs, spec["repeats"], spec["rounds"])
               for shape, inputs in spec["shapes"].items()}
    with open(result_path, "w") as handle:
        json.dump(timings, handle)


if __name__ == "__main__":
    _main(*sys.argv[1:])
