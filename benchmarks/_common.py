"""Helpers shared by the benchmark scripts: machine description, interleaved timing, output files."""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
from typing import Callable, Dict, Optional, Set, Tuple

import torch

# Machine description: one copy, in the package (the compress command prints it too).
from torchprune.analysis.machine import cpu_fields, describe, machine_info, vector_isa  # noqa: F401

# The one timing helper (warm-up, round-robin, medians), shared with tp.sparsify and the report;
# the scripts import it from here.
from torchprune.timing import medians, sample_interleaved, time_interleaved, warm_up  # noqa: F401

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def set_threads(threads: int) -> Optional[object]:
    """Pins torch (and numpy's BLAS, when threadpoolctl is there) to ``threads`` threads.

    Returns the threadpoolctl limiter (keep it alive) or None.
    """
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=threads, user_api="blas")
    except ImportError:
        return None


def time_cuda(runners: Dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> Dict[str, float]:
    """time_interleaved for GPU work: median seconds per call measured with CUDA events.

    Each call is bracketed by two events on the current stream after the queue has drained
    (torch.cuda.synchronize), so a sample is the GPU time of that one call, launch gaps inside it
    included, and never overlaps the previous call. Round-robin over the runners like the CPU timer.
    """
    warm_up(runners, warmup, torch.device("cuda"))
    return event_medians(runners, repeats)


def event_medians(runners: Dict[str, Callable[[], object]], repeats: int, per: int = 1) -> Dict[str, float]:
    """Median seconds of each runner over ``repeats`` round-robin samples, each one call bracketed
    by two CUDA events after the queue has drained, divided by ``per`` (calls inside one sample)."""
    times = {name: [] for name in runners}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        for name, run in runners.items():
            torch.cuda.synchronize()
            start.record()
            run()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / per)
    return medians(times)


def time_cuda_graph(runners: Dict[str, Callable[[], object]], repeats: int, calls: int = 20,
                    warmup: int = 3) -> Tuple[Dict[str, float], Dict[str, str]]:
    """time_cuda without the host: median GPU seconds per call, each sample one replay of a CUDA
    graph holding ``calls`` back-to-back calls, divided by ``calls``.

    A call timed alone between two events also holds the host's launch latency (tens of
    microseconds through Python and the dispatcher, more than a small kernel runs); a graph replay
    holds only the GPU's work, which is what a model captured in a graph, or a host that runs ahead
    of the GPU, waits for. Runners that cannot be captured (a library that synchronizes, say) are
    timed with time_cuda instead and returned in the second dict with the reason.
    """
    warm_up(runners, warmup, torch.device("cuda"))
    graphs, fallback = {}, {}
    for name, run in runners.items():
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # capture wants its first calls made off the default stream
                run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    run()
            graph.replay()
            torch.cuda.synchronize()
            graphs[name] = graph
        except Exception as error:  # not capturable: timed per call below
            torch.cuda.synchronize()
            fallback[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    result = event_medians({name: graph.replay for name, graph in graphs.items()}, repeats, per=calls)
    if fallback:
        result.update(time_cuda({name: runners[name] for name in fallback}, repeats, warmup))
    return result, fallback


def first_calls(runners: Dict[str, Callable[[], object]]) -> Dict[str, float]:
    """One timed call of each runner, in turn: its warm-up, and the measure a time budget is cut by."""
    return {name: warm_up({name: run}) for name, run in runners.items()}


def plan_repeats(first: Dict[str, float], case_seconds: float, slow_seconds: float,
                 most: int) -> Tuple[int, Set[str]]:
    """How many interleaved repeats fit a case into about ``case_seconds``, and which runners are slow.

    A runner whose first call took over ``slow_seconds`` is slow: it gets ``min(3, most)`` repeats.
    The others share the rest of the budget: ``(case_seconds - 3 * slow time) / fast time`` repeats,
    at least ``min(3, most)`` and at most ``most``.
    """
    few = min(3, most)
    slow = {name for name, seconds in first.items() if seconds > slow_seconds}
    fast_time = sum(seconds for name, seconds in first.items() if name not in slow)
    left = case_seconds - few * sum(first[name] for name in slow)
    repeats = int(left / fast_time) if fast_time > 0 else most
    return max(few, min(most, repeats)), slow


def sample_within(runners: Dict[str, Callable[[], object]], repeats: int, slow: Set[str],
                  few: int) -> Dict[str, list]:
    """sample_interleaved where the slow runners take part in the first ``few`` rounds only: every
    runner stays interleaved with the others while it runs; a slow one gets ``few`` samples."""
    samples = sample_interleaved(runners, min(few, repeats))
    fast = {name: run for name, run in runners.items() if name not in slow}
    if fast and repeats > few:
        for name, values in sample_interleaved(fast, repeats - few).items():
            samples[name] += values
    return samples


def stream_read(sizes, seconds: float = 0.2) -> list:
    """Read bandwidth of this machine per buffer size: GB/s of ``buffer.sum()`` over a float32 tensor
    of each size in bytes, medians of repeats that take about ``seconds``. Each size is timed on its
    own, so that a buffer that fits a cache level stays there between calls, as a packed weight does
    in repeated inference. A torch call, like the kernels it is compared with: its per-call overhead
    is in the time (it matters for the smallest buffers only)."""
    out = []
    for nbytes in sizes:
        buffer = torch.rand(nbytes // 4)
        first = warm_up({"sum": buffer.sum}, 2) / 2
        repeats = int(min(500, max(10, seconds / max(first, 1e-6))))
        median = time_interleaved({"sum": buffer.sum}, repeats, warmup=1)["sum"]
        out.append({"bytes": nbytes, "GB/s": nbytes / median / 1e9})
    return out


def size_label(nbytes: int) -> str:
    """256 KiB, 4 MiB, ... (binary units)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def gpu_info() -> dict:
    """The GPU, its compute capability and the CUDA / cuDNN / driver versions torch runs with."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "torch": torch.__version__,
            "python": platform.python_version(), "tf32": False}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def describe_gpu(info: dict) -> str:
    return (f"{info['gpu']} (sm_{info['capability'].replace('.', '')}), CUDA {info['cuda']}, "
            f"cuDNN {info['cudnn']}, torch {info['torch']}, TF32 off")


def require_cuda(parser: argparse.ArgumentParser) -> None:
    """Stops with a clear message unless CUDA benchmarks can run: a GPU that torch sees and a
    torchprune build with its CUDA ops. Also turns TF32 off, so that fp32 means fp32 (cuDNN and
    cuBLAS would otherwise run fp32 products on TF32 tensor cores)."""
    if not torch.cuda.is_available():
        parser.error(f"--device cuda needs a GPU, but torch {torch.__version__} sees none "
                     "(torch.cuda.is_available() is False); run with --device cpu")
    import torchprune.ops  # noqa: F401  (loads the C++ ops)

    if not torch._C._dispatch_has_kernel_for_dispatch_key("torchprune::masked_linear", "CUDA"):
        parser.error("--device cuda needs torchprune's CUDA ops, but this build has none: rebuild with "
                     "FORCE_CUDA=1 pip install --no-build-isolation -e .")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default) or cuda: dense cuBLAS/cuDNN vs torch CSR (cuSPARSE) vs "
                             "torchprune vs 2:4 semi-structured, fp32 and fp16")


class PeakMemory:
    """Peak extra resident memory of this process during a ``with`` block: ``extra_bytes``, the
    peak RSS inside the block minus the RSS at its start (None where it cannot be measured).

    Linux only: on entry, garbage is collected and glibc returns freed heap pages to the system
    (malloc_trim, so memory freed by earlier work does not hide new allocations), then the kernel's
    peak counter VmHWM is reset to the current RSS (/proc/self/clear_refs); on exit VmHWM is read.
    The kernel tracks the peak itself, so no spike is missed and nothing samples during the block.
    """

    METHOD = "VmHWM (peak RSS) after clear_refs, minus RSS at the start; gc + malloc_trim before"

    def __init__(self) -> None:
        self.extra_bytes: Optional[int] = None

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._start_kb = self._status_kb("VmRSS")
        except (OSError, StopIteration):
            self._start_kb = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start_kb is not None:
            self.extra_bytes = (self._status_kb("VmHWM") - self._start_kb) * 1024


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return None
    return plt


def parse_args(description: str, quick_help: str, argv=None, default_repeats: int = 10,
               add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    """The options every sparse benchmark takes (--quick, --repeats, --threads, --out, --device),
    checked; the threads are pinned and ``args.repeats`` is capped at 3 under --quick. --device
    cuda stops with a clear message where no GPU (or no CUDA build of torchprune) is there.
    ``add_arguments(parser)``, where given, adds a script's own options (checked by their ``type``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, default=default_repeats)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=RESULTS)
    add_device_argument(parser)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    if args.device == "cuda":
        require_cuda(parser)
    args.limiter = set_threads(args.threads)  # kept alive for the run
    if args.quick:
        args.repeats = min(args.repeats, 3)
    return args


def speedup_axis(ax, sparsities, batch: int, ylabel: str) -> None:
    """The common frame of a speedup-vs-sparsity panel: the ideal 1/(1-s) line, the break-even line,
    a log scale, labels and the legend."""
    ax.plot(sparsities, 1 / (1 - sparsities), "k-", linewidth=1, label="ideal 1/(1-s)")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(ylabel)
    ax.set_title(f"batch {batch}")
    ax.legend(fontsize=6, loc="upper left")


def save_figure(plt, fig, title: str, path: str, dpi: int = 100) -> None:
    """Titles, lays out, writes and closes ``fig``."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def semi_structured(weight: torch.Tensor):
    """``weight`` (CUDA, fp16) pruned to 2:4 by magnitude and converted with
    torch.sparse.to_sparse_semi_structured, and its dense 2:4 twin; or (None, reason) where this
    torch / GPU has no semi-structured sparsity (needs sm_80+, fp16/bf16, shapes multiple of 64)."""
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return None, f"2:4 is benchmarked in fp16/bf16 only, not {weight.dtype}"
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:
        return None, "torch.sparse.to_sparse_semi_structured is missing"
    groups = weight.detach().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    dense = (groups * keep).reshape(weight.shape).contiguous()
    try:
        return to_sparse_semi_structured(dense), dense
    except Exception as error:  # unsupported GPU, dtype or shape
        return None, f"to_sparse_semi_structured failed: {str(error).splitlines()[0][:120]}"


def fmt_ms(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


def random_mask(shape, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly round(sparsity * numel) pruned entries at random positions (true = kept)."""
    numel = 1
    for size in shape:
        numel *= size
    pruned = torch.randperm(numel, generator=generator)[: round(sparsity * numel)]
    mask = torch.ones(numel, dtype=torch.bool)
    mask[pruned] = False
    return mask.reshape(shape)


def break_even(results, group_key: str, speedup_key: str) -> dict:
    """Per value of ``group_key`` (e.g. batch): the lowest measured sparsity from which the sparse
    kernel is faster (``speedup_key`` > 1) in every case at that sparsity and above; None if never."""
    out = {}
    for group in sorted({r[group_key] for r in results}):
        rows = [r for r in results if r[group_key] == group]
        levels = sorted({r["sparsity"] for r in rows})
        found = None
        for level in reversed(levels):
            if all(r[speedup_key] > 1 for r in rows if r["sparsity"] >= level):
                found = level
            else:
                break
        out[group] = found
    return out
