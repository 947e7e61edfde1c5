"""Is a pruned linear layer faster on the sparse kernel? torchprune vs dense vs torch CSR.

One question: at the layer shapes and token counts of real transformers, how does ``y = x @ W.T``
with a sparse ``W`` compare, fp32 on the CPU, when run by

* F.linear:    torch's dense product (MKL SGEMM);
* numpy:       numpy's dense product (OpenBLAS: GEMV ``W @ x`` at M = 1, GEMM ``x @ W.T`` above).
               On AMD CPUs MKL's small-batch path is weak (ours: 13-19 GB/s at batch 1 where OpenBLAS
               streams 80 GB/s), so a speedup over F.linear alone would flatter the sparse kernel;
* torch CSR:   ``torch.addmm(bias, W_csr, x.T)`` (MKL sparse BLAS), the bar to clear;
* torchprune:  ``torch.ops.torchprune.sparse_linear`` on ``pack_csr(W)``.

The grid. Weights (out_features x in_features) of MiniLM (384x384 attention, 1536x384 and 384x1536
MLP), BERT-base (768x768, 3072x768, 768x3072) and Llama-7B (4096x4096, 11008x4096, 4096x11008);
M = 1, 128, 512, 2048 rows of x (batch x tokens: one decoding step, a sentence, a long prompt, a
batch of prompts); sparsities 0.5, 0.7, 0.8, 0.9, 0.95. ``--shapes``, ``--batches`` and
``--sparsities`` each replace one axis (of the --quick grid under --quick) to run a sub-grid; its
files end in ``_subgrid`` so that they do not overwrite a full run's. ``--quick``: 384x384, M = 1
and 128, 90%. Weights are random with exactly ``round(s * N * K)`` zeros at random positions.

Timing. Per case, one timed call of each candidate is its warm-up and sizes the case: the repeats
are as many as fit about ``--case-seconds`` (default 10) after it, at least 3 and at most
``--repeats``. A candidate whose first call took over ``--slow-seconds`` (default 3; torch CSR at
low sparsity and M >= 512 on the Llama shapes, even torchprune at 50% and M = 2048 there) is timed
with 3 repeats only, and the row names it under "slow"; "repeats" records the count per candidate.
The torch candidates of a case run in one interleaved loop (round-robin, so drift hits all alike;
a slow one takes part in the first 3 rounds); numpy runs in its own loop just before (its thread
pool and torch's fight over the cores when interleaved call by call); medians. numpy runs at every
M, not only at M = 1 where OpenBLAS GEMV is the honest dense bar on AMD: above it OpenBLAS GEMM has
beaten MKL at some shapes (768x768 at 64 and 256 rows in earlier runs), so "best dense" without it
would flatter the sparse kernel, and it costs one dense product's share of each case's budget.
Every candidate is checked against a float64 F.linear on the first 64 rows of x (a float64 product
of all 2048 rows of a Llama weight would take longer than timing it).

Printed per case: times, speedups, the achieved GFLOP/s of torchprune (useful flops,
2*M*nnz = 2*M*K*N*(1-s)) and of F.linear (2*M*K*N), and at M = 1 the bandwidth torchprune streams,
(packed bytes + 4K + 4N) / time, where packed bytes = 4(N+1) (row_ptr, int32) + 2 or 4 bytes per
nonzero (col_idx, int16 while K < 32768) + 4 bytes per nonzero (values). Once per run, at the start,
a stream-read bandwidth is measured per buffer size (_common.stream_read: ``.sum()`` of a float32
tensor of 256 KiB, 1 MiB, 4 MiB, 16 MiB, 64 MiB, each on its own; here 512 KiB of L2 per core and a
32 MiB L3, so L2, L2/L3, L3, L3, DRAM; a torch call like the kernels, so its per-call overhead of a
few microseconds holds the smallest sizes under the cache's own bandwidth, as it does the kernels
on the small shapes); an M = 1 row gives torchprune's bandwidth as a fraction of
that of the smallest buffer at least as large as its packed weight (the largest buffer where none
is: DRAM either way). Weights stay in cache between calls when they fit, as in repeated inference,
but F.linear's dense weight passes through the caches between two torchprune calls, so the fraction
is against the level the packed weight would live in, a bound it may not reach.

``--block R``: the weight is pruned in whole R x 1 blocks (R output rows, one input column; exactly
``round(s * N/R * K)`` random blocks pruned) and "torchprune" is ``block_sparse_linear`` on
``pack_bsr(W, R)``; a fifth candidate, "tp CSR", runs the same weight through ``sparse_linear``, so the
row says what the block format gains over CSR at the same pattern. Packed bytes are then
4(N/R+1) + 2 or 4 per block + 4R per block. Files get ``_block{R}`` in their name.

``--nm N:M`` (M in 2, 4, 8): the weight keeps N random weights of every M consecutive inputs (the
sparsity axis becomes 1 - N/M) and "torchprune" is ``nm_sparse_linear`` on ``pack_nm(W, 8N/M)``
(the N:8 format: 4 bytes per value plus 4 bytes of codes per 8 values); "tp CSR" again runs the
same weight through ``sparse_linear``. Files get ``_nm{N}of{M}`` in their name.

Writes bench_linear[_block{R}|_nm{N}of{M}][_quick|_subgrid].json and two PNGs:

* .png: one panel per M, speedup over the best dense product (F.linear or numpy) against sparsity,
  torchprune solid and torch CSR dotted, one color per shape, the ideal 1/(1-s) and, at M = 1, the
  memory bound 4/(6(1-s)) of CSR with int16 column indices (dense reads 4 bytes per weight, the
  packed weight 6 per nonzero);
* _roofline.png: achieved GFLOP/s against arithmetic intensity, log-log, one color per M, with
  intensity = useful flops / bytes that must move at least once per call:
      torchprune: 2*M*nnz   / (packed bytes + 4*M*K + 4*M*N)
      F.linear:   2*M*K*N   / (4*N*K        + 4*M*K + 4*M*N)
  and a sloped line GFLOP/s = bandwidth x intensity per measured stream bandwidth (a point near the
  line of the level its data live in is bandwidth bound there); the dotted level line is the
  fastest F.linear measured (an empirical compute roof, not the chip's peak).

The full grid is 180 cases and takes roughly 40 minutes on 2 cores (estimated from cases timed on
a shared machine), over half of it in the M = 2048 Llama cases: a dense 11008x4096 product at
M = 2048 is 185 GFLOP, over a second; torch CSR at 50% took 30-45 s a call there. The stream read
and the batch-1 rows only mean something on an otherwise idle machine: with 2 threads on 2 cores,
another process holding a core stalls each parallel torch call for a scheduler tick (8 ms here).

With ``--device cuda`` the same grid runs on the GPU, fp32 (TF32 off) and fp16, comparing

* dense:       F.linear (cuBLAS);
* torch CSR:   ``torch.addmm(bias, W_csr, x.T)`` (cuSPARSE);
* torchprune:  ``sparse_linear`` on the packed weight, moved to the GPU;
* 2:4:         F.linear on ``to_sparse_semi_structured`` of the weight pruned to 2:4 by magnitude
               (a different, 50%-sparse weight: its speedup is over the dense layer of that shape;
               fp16 only, 'n/a' where this torch or GPU lacks it).

The candidates run interleaved, medians of ``--repeats`` (--case-seconds and --slow-seconds are
for the CPU). Two timers: ``--timer events`` (default; _common.time_cuda) brackets each call alone
with CUDA events after a synchronize, so the host's launch through Python is inside; ``--timer
graph`` (_common.time_cuda_graph) replays 20 calls captured in a CUDA graph, the GPU's time alone.
``--dtypes`` picks float32 and/or float16. Each candidate is first checked against the rounding
bound of its accumulation (``within_bound``). Output in
bench_linear_cuda[_graph][_quick|_subgrid].json / .png. A dense weight larger than the L2 (50 MiB
on an H100, 60 MB on an H200: fp32 4096x4096 and up, fp16 Llama shapes) comes from device memory
on every call; smaller ones, and every 90%-sparse packed weight here, stay in the L2 between calls,
as in repeated inference.

    python benchmarks/bench_linear.py [--quick] [--repeats 15] [--threads 2] [--out benchmarks/results]
        [--shapes 384x384,3072x768] [--batches 1,128] [--sparsities 0.7,0.9]
        [--case-seconds 10] [--slow-seconds 3] [--device cpu|cuda] [--timer events|graph]
        [--dtypes float32,float16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchprune import ops as _ops  # noqa: E402

from _common import (  # noqa: E402
    break_even,
    describe,
    describe_gpu,
    first_calls,
    fmt_ms,
    gpu_info,
    machine_info,
    medians,
    parse_args,
    plan_repeats,
    pyplot,
    random_mask,
    ratio,
    sample_within,
    save_figure,
    semi_structured,
    size_label,
    speedup_axis,
    stream_read,
    time_cuda,
    time_cuda_graph,
    write_json,
)

SHAPES = [(384, 384), (1536, 384), (384, 1536), (768, 768), (3072, 768), (768, 3072),
          (4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
BATCHES = [1, 128, 512, 2048]  # M, the rows of x: batch x tokens
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
QUICK = dict(shapes=[(384, 384)], batches=[1, 128], sparsities=[0.9])
GRID = dict(shapes=SHAPES, batches=BATCHES, sparsities=SPARSITIES)
CANDIDATES = ("F.linear", "numpy", "torch CSR", "torchprune")  # plus "tp CSR" with --block
CHECK_ROWS = 64  # the rows of x each candidate is checked on against float64
STREAM_BYTES = (2**18, 2**20, 2**22, 2**24, 2**26)  # 256 KiB .. 64 MiB


def comma_list(text: str, item, form: str) -> list:
    """``text`` split at commas, each part read by ``item`` (None or an error: not of ``form``);
    duplicates dropped, order kept. An argparse type: its error names the option."""
    try:
        values = [item(part.strip()) for part in text.split(",")]
    except ValueError:
        values = [None]
    if None in values:
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    return list(dict.fromkeys(values))


def shape_list(text: str) -> list:
    def shape(part):
        out_features, in_features = (int(v) for v in part.lower().split("x"))  # ValueError unless two
        return (out_features, in_features) if min(out_features, in_features) >= 1 else None

    return comma_list(text, shape, "OUTxIN[,OUTxIN...] with positive integers (out_features x in_features), "
                                   "e.g. 384x384,3072x768")


def batch_list(text: str) -> list:
    return comma_list(text, lambda part: int(part) if int(part) >= 1 else None,
                      "M[,M...] with positive integers (rows of x: batch x tokens), e.g. 1,128")


def sparsity_list(text: str) -> list:
    return comma_list(text, lambda part: float(part) if 0 <= float(part) < 1 else None,
                      "S[,S...] with each S in [0, 1), e.g. 0.7,0.9")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def nm_ratio(text: str) -> tuple:
    """"N:M" with M in 2, 4, 8 and 0 < N < M, as (N, M). An argparse type."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        n = m = 0
    if m not in (2, 4, 8) or not 0 < n < m:
        raise argparse.ArgumentTypeError(f"expected N:M with M in 2, 4, 8 and 0 < N < M, got {text!r}")
    return n, m


def dtype_list(text: str) -> list:
    names = {"float32": torch.float32, "float16": torch.float16}
    return comma_list(text, names.get, "float32, float16 or float32,float16")


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """bench_linear's own options: a sub-grid, and the per-case time budget (CPU)."""
    parser.add_argument("--shapes", type=shape_list, help="weights to run, OUTxIN comma-separated "
                        "(e.g. 384x384,3072x768); default: the grid's 9 transformer shapes")
    parser.add_argument("--batches", type=batch_list, help="rows M of x, comma-separated (e.g. 1,128); "
                        "default 1,128,512,2048")
    parser.add_argument("--sparsities", type=sparsity_list, help="comma-separated, each in [0, 1) "
                        "(e.g. 0.7,0.9); default 0.5,0.7,0.8,0.9,0.95")
    parser.add_argument("--block", type=int, choices=(2, 4, 8), help="prune in whole Rx1 blocks and time the "
                        "block-sparse kernel (also against torchprune CSR on the same weight)")
    parser.add_argument("--nm", type=nm_ratio, help="N:M (M in 2, 4, 8): keep N of every M inputs and time the "
                        "N:8 kernel (also against torchprune CSR on the same weight); replaces --sparsities")
    parser.add_argument("--case-seconds", type=positive_seconds, default=10.0,
                        help="about how long the repeats of one case may take (CPU; default 10)")
    parser.add_argument("--slow-seconds", type=positive_seconds, default=3.0,
                        help="a candidate whose first call takes longer gets 3 repeats (CPU; default 3)")
    parser.add_argument("--dtypes", type=dtype_list, default=list(CUDA_DTYPES),
                        help="GPU only: float32, float16 or both, comma-separated (default both)")
    parser.add_argument("--timer", choices=("events", "graph"), default="events",
                        help="GPU only: 'events' times each call alone, host launch included; 'graph' "
                        "replays 20 calls captured in a CUDA graph (GPU time only; default events)")


def grid_of(args) -> dict:
    """The grid to run: the full (or --quick) one with each axis given on the command line replaced."""
    base = QUICK if args.quick else GRID
    grid = {axis: getattr(args, axis) or base[axis] for axis in ("shapes", "batches", "sparsities")}
    if getattr(args, "nm", None):
        grid["sparsities"] = [1 - args.nm[0] / args.nm[1]]
    return grid


def result_name(args, device: str = "") -> str:
    """bench_linear[_cuda][_quick][_subgrid]: a sub-grid never overwrites a full run's files."""
    subgrid = any(getattr(args, axis, None) for axis in ("shapes", "batches", "sparsities"))
    block = f"_block{args.block}" if getattr(args, "block", None) else ""
    if getattr(args, "nm", None):
        block = f"_nm{args.nm[0]}of{args.nm[1]}"
    graph = "_graph" if device and getattr(args, "timer", "events") == "graph" else ""
    return "bench_linear" + (f"_{device}" if device else "") + block + graph + ("_quick" if args.quick else "") + (
        "_subgrid" if subgrid else "")


def make_runners(shape, batch, sparsity, seed=0, block=None, nm=None):
    """The four ways of computing the same product (five with ``block`` or ``nm``), each a no-argument closure;
    a checker (every candidate on the first CHECK_ROWS rows of x against float64); and the packed
    weight's bytes and nonzeros."""
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    weight = torch.randn(shape, generator=generator)
    if block:
        kept = random_mask((out_features // block, in_features), sparsity, generator).repeat_interleave(block, 0)
    elif nm:
        n, m = nm
        scores = torch.rand(out_features, in_features // m, m, generator=generator)
        chosen = scores.topk(n, dim=-1).indices
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True).reshape(shape)
    else:
        kept = random_mask(shape, sparsity, generator)
    weight[~kept] = 0.0
    x = torch.randn(batch, in_features, generator=generator)
    bias_column = torch.zeros(out_features, 1)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore")
        weight_csr = weight.to_sparse_csr()
    row_ptr, col_idx, values = packed = _ops.pack_csr(weight)
    if block:
        block_ptr, block_col, block_values = packed = _ops.pack_bsr(weight, block)
    if nm:
        nm_codes, nm_values = packed = _ops.pack_nm(weight, 8 * nm[0] // nm[1], kept)
    weight_np = weight.numpy()

    def candidates(rows):
        rows_np = rows.numpy()
        vector = np.ascontiguousarray(rows_np[0])
        run = {
            "F.linear": lambda: F.linear(rows, weight),
            "numpy": (lambda: weight_np @ vector) if len(rows) == 1 else (lambda: rows_np @ weight_np.T),
            "torch CSR": lambda: torch.addmm(bias_column, weight_csr, rows.t()).t(),
            "torchprune": lambda: _ops.sparse_linear(rows, row_ptr, col_idx, values, in_features),
        }
        if block:
            run["tp CSR"] = run["torchprune"]
            run["torchprune"] = lambda: _ops.block_sparse_linear(rows, block_ptr, block_col, block_values,
                                                                 in_features)
        if nm:
            run["tp CSR"] = run["torchprune"]
            run["torchprune"] = lambda: _ops.nm_sparse_linear(rows, nm_codes, nm_values, in_features)
        return run

    def check():
        rows = x[:CHECK_ROWS]
        reference = F.linear(rows.double(), weight.double()).float()
        for name, run in candidates(rows).items():
            y = torch.as_tensor(run()).reshape(len(rows), out_features)
            torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-3, msg=f"{name} disagrees")

    packed_bytes = sum(t.numel() * t.element_size() for t in packed)
    return candidates(x), check, packed_bytes, values.numel() if not block else block_values.numel()


def time_case(runners, args):
    """Medians (seconds), repeats per candidate, the slow ones and the first calls (seconds) of a case:
    a timed first call of each, then numpy alone and the torch candidates interleaved, within budget."""
    first = first_calls(runners)
    repeats, slow = plan_repeats(first, args.case_seconds, args.slow_seconds, args.repeats)
    few = min(3, args.repeats)
    # numpy in its own loop: interleaved call by call, OpenBLAS's spinning workers and torch's take
    # turns holding the 2 cores for whole scheduler ticks (768x768 at batch 1 measured numpy 3.4 ms
    # and torch CSR 4.1 ms per call, against 0.02 and 0.05 ms apart). The torch candidates stay
    # interleaved with each other.
    samples = sample_within({"numpy": runners["numpy"]}, repeats, slow, few)
    samples.update(sample_within({k: v for k, v in runners.items() if k != "numpy"}, repeats, slow, few))
    return medians(samples), {k: len(v) for k, v in samples.items()}, slow, first


def stream_level(nbytes: int, stream: list) -> dict:
    """The measured buffer just at or above ``nbytes`` (the largest where none is)."""
    return next((level for level in stream if level["bytes"] >= nbytes), stream[-1])


def case_row(shape, batch, sparsity, med, timing, packed_bytes, nonzeros, stream) -> dict:
    """A result row: times (ms), speedups, achieved GFLOP/s, arithmetic intensities, how it was timed
    and, at M = 1, the bandwidth torchprune streams and its fraction of the measured stream bandwidth."""
    out_features, in_features = shape
    counts, slow, first = timing
    row = {"out_features": out_features, "in_features": in_features, "batch": batch, "sparsity": sparsity,
           **{f"{k} ms": v * 1e3 for k, v in med.items()}}
    tp, best_dense = med["torchprune"], min(med["F.linear"], med["numpy"])
    row["speedup vs F.linear"] = med["F.linear"] / tp
    row["speedup vs numpy"] = med["numpy"] / tp
    row["speedup vs best dense"] = best_dense / tp
    row["speedup vs torch CSR"] = med["torch CSR"] / tp
    row["torch CSR vs best dense"] = best_dense / med["torch CSR"]
    if "tp CSR" in med:  # --block / --nm: the format against torchprune's CSR on the same weight
        row["speedup vs tp CSR"] = med["tp CSR"] / tp
    useful, dense = 2 * batch * nonzeros, 2 * batch * out_features * in_features
    activations = 4 * batch * (in_features + out_features)  # x read, y written
    row["torchprune GFLOP/s"] = useful / tp / 1e9
    row["F.linear GFLOP/s"] = dense / med["F.linear"] / 1e9
    row["torchprune flop/byte"] = useful / (packed_bytes + activations)
    row["F.linear flop/byte"] = dense / (4 * out_features * in_features + activations)
    row["nonzeros"], row["packed bytes"] = nonzeros, packed_bytes
    row["repeats"], row["slow"] = counts, sorted(slow)
    row["first call ms"] = {k: v * 1e3 for k, v in first.items()}
    if batch == 1:
        level = stream_level(packed_bytes, stream)
        row["torchprune GB/s"] = (packed_bytes + activations) / tp / 1e9
        row["stream buffer bytes"] = level["bytes"]
        row["fraction of stream bandwidth"] = row["torchprune GB/s"] / level["GB/s"]
    return row


HEADER = (f"{'shape':>11} {'M':>5} {'sparsity':>8} {'F.linear ms':>11} {'numpy ms':>9} {'CSR ms':>9} "
          f"{'tp ms':>9} {'vs F.linear':>11} {'vs numpy':>9} {'vs CSR':>7} {'tp GF/s':>8} {'F.lin GF/s':>10} "
          f"{'reps':>4} {'tp GB/s':>8} {'of stream':>15}  slow (3 repeats)")


def print_row(row: dict) -> None:
    text = (f"{row['out_features']:>5}x{row['in_features']:<5} {row['batch']:>5} {row['sparsity']:>8.2f} "
            f"{row['F.linear ms']:>11.3f} {row['numpy ms']:>9.3f} {row['torch CSR ms']:>9.3f} "
            f"{row['torchprune ms']:>9.3f} {row['speedup vs F.linear']:>10.2f}x {row['speedup vs numpy']:>8.2f}x "
            f"{row['speedup vs torch CSR']:>6.2f}x {row['torchprune GFLOP/s']:>8.2f} {row['F.linear GFLOP/s']:>10.2f} "
            f"{row['repeats']['torchprune']:>4}")
    if row["batch"] == 1:
        share = f"{row['fraction of stream bandwidth']:.2f} of {size_label(row['stream buffer bytes'])}"
        text += f" {row['torchprune GB/s']:>8.1f} {share:>15}"
    else:
        text += f" {'':>8} {'':>15}"
    if "speedup vs tp CSR" in row:
        text += f"  vs tp CSR {row['speedup vs tp CSR']:.2f}x"
    print(text + ("  " + ", ".join(row["slow"]) if row["slow"] else ""))


def main(argv=None) -> None:
    args = parse_args(__doc__.split("\n")[0], "one shape (384x384), M = 1 and 128, 90%% only", argv,
                      default_repeats=15, add_arguments=add_grid_arguments)
    grid = grid_of(args)
    if args.device == "cuda":
        if args.block or args.nm:
            raise SystemExit("--block / --nm: the block-sparse and N:8 kernels run on the CPU only")
        return main_cuda(args, grid)
    info = machine_info()
    print(f"machine: {describe(info)}; fp32")
    stream = stream_read(STREAM_BYTES)
    print("stream read (torch .sum() of fp32, medians): "
          + ", ".join(f"{size_label(s['bytes'])} {s['GB/s']:.1f} GB/s" for s in stream))
    print(f"medians of up to {args.repeats} interleaved repeats, about {args.case_seconds:g} s a case (at least 3; "
          f"3 for a candidate whose first call takes over {args.slow_seconds:g} s); speedup = other time / "
          "torchprune time\nGF/s: torchprune useful (2*M*nnz) and F.linear (2*M*K*N) GFLOP/s; M = 1: the bandwidth "
          "torchprune streams and its share of the stream bandwidth of the buffer size above its packed weight\n")
    print(HEADER)
    print("-" * len(HEADER))
    start, results = time.perf_counter(), []
    for shape in grid["shapes"]:
        for batch in grid["batches"]:
            for sparsity in grid["sparsities"]:
                case_start = time.perf_counter()
                runners, check, packed_bytes, nonzeros = make_runners(shape, batch, sparsity, block=args.block,
                                                                      nm=args.nm)
                check()
                med, *timing = time_case(runners, args)
                row = case_row(shape, batch, sparsity, med, timing, packed_bytes, nonzeros, stream)
                row["case seconds"] = time.perf_counter() - case_start
                results.append(row)
                print_row(row)
    print(f"\n{len(results)} cases in {time.perf_counter() - start:.0f} s")
    if any(r.get("fraction of stream bandwidth", 0) > 1.5 for r in results):
        print("note: an M = 1 row streams well above the stream read of its buffer size: the stream read "
              "was probably slowed (another process on the cores?); its fractions mean little")
    finish(args, info, stream, results)


def finish(args, info, stream, results) -> None:
    """The break-even printout, the JSON and the two figures."""
    even = {f"vs {dense}": break_even(results, "batch", f"speedup vs {dense}") for dense in ("F.linear", "best dense")}
    for which, by_batch in even.items():
        print(f"break-even sparsity {which} (faster in every shape from there up): "
              + ", ".join(f"M = {b}: {s if s is not None else 'never'}" for b, s in by_batch.items()))
    name = result_name(args)
    write_json(os.path.join(args.out, name + ".json"),
               {"machine": info, "dtype": "float32", "repeats": args.repeats, "case_seconds": args.case_seconds,
                "slow_seconds": args.slow_seconds, "stream_read": stream, "results": results, "break_even": even})
    plot(results, os.path.join(args.out, name + ".png"), info)
    plot_roofline(results, stream, os.path.join(args.out, name + "_roofline.png"), info)
    print(f"\nwrote {args.out}/{name}.json, {name}.png and {name}_roofline.png")


def shape_colors(plt, shapes) -> dict:
    """One clearly different color per shape: tab10 up to 10 shapes, viridis beyond."""
    cmap = plt.get_cmap("tab10") if len(shapes) <= 10 else plt.get_cmap("viridis", len(shapes))
    return {shape: cmap(i) for i, shape in enumerate(shapes)}


def plot(results, path, info) -> None:
    """One panel per M: speedup over the best dense against sparsity, torchprune solid and torch CSR
    dotted, one color per shape (legend right of the last panel), the ideal and memory-bound lines."""
    plt = pyplot()
    if plt is None:
        return
    from matplotlib.lines import Line2D

    batches = sorted({r["batch"] for r in results})
    shapes = list(dict.fromkeys((r["out_features"], r["in_features"]) for r in results))  # in grid order
    colors = shape_colors(plt, shapes)
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches) + 1.5, 4.5), squeeze=False)
    sparsities = np.linspace(min(r["sparsity"] for r in results), max(r["sparsity"] for r in results), 50)
    for ax, batch in zip(axes[0], batches):
        for shape in shapes:
            rows = sorted((r for r in results if r["batch"] == batch
                           and (r["out_features"], r["in_features"]) == shape), key=lambda r: r["sparsity"])
            xs = [r["sparsity"] for r in rows]
            ax.plot(xs, [r["speedup vs best dense"] for r in rows], "o-", color=colors[shape], markersize=3)
            ax.plot(xs, [r["torch CSR vs best dense"] for r in rows], ":", color=colors[shape], linewidth=1)
        if batch == 1:
            ax.plot(sparsities, 4 / (6 * (1 - sparsities)), "k--", linewidth=1,
                    label="memory bound, CSR int16: 4/(6(1-s))")
        speedup_axis(ax, sparsities, batch, "speedup over the best dense (F.linear or numpy)")
        ax.set_title(f"M = {batch} (batch x tokens)")
    handles = [Line2D([], [], color=colors[s], marker="o", markersize=3, label=f"{s[0]}x{s[1]}") for s in shapes]
    handles += [Line2D([], [], color="gray", marker="o", markersize=3, label="torchprune"),
                Line2D([], [], color="gray", linestyle=":", label="torch CSR")]
    last = axes[0][-1]  # its own legend (ideal, bounds) kept as an artist; the shapes' legend right of it
    last.add_artist(last.get_legend())  # (the axes' legend is the one tight_layout makes room for)
    last.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), title="out x in",
                title_fontsize=7)
    save_figure(plt, fig, f"Sparse linear, fp32 - {describe(info)}", path)


def plot_roofline(results, stream, path, info) -> None:
    """Achieved GFLOP/s against arithmetic intensity (log-log; formulas in the module docstring):
    torchprune filled, F.linear hollow, one color per M; a sloped line per measured stream bandwidth
    and a dotted level at the fastest F.linear measured."""
    plt = pyplot()
    if plt is None:
        return
    batches = sorted({r["batch"] for r in results})
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, batch in enumerate(batches):
        rows = [r for r in results if r["batch"] == batch]
        ax.scatter([r["torchprune flop/byte"] for r in rows], [r["torchprune GFLOP/s"] for r in rows],
                   s=16, color=f"C{i}", label=f"torchprune, M = {batch}")
        ax.scatter([r["F.linear flop/byte"] for r in rows], [r["F.linear GFLOP/s"] for r in rows], s=22,
                   marker="s", facecolors="none", edgecolors=f"C{i}", label=f"F.linear, M = {batch}")
    intensities = [r[k] for r in results for k in ("torchprune flop/byte", "F.linear flop/byte")]
    rates = [r[k] for r in results for k in ("torchprune GFLOP/s", "F.linear GFLOP/s")]
    xs = np.geomspace(min(intensities) / 2, max(intensities) * 2, 50)
    for j, level in enumerate(stream):
        gray = str(0.15 + 0.6 * j / max(1, len(stream) - 1))
        ax.plot(xs, level["GB/s"] * xs, "-", color=gray, linewidth=0.8,
                label=f"stream {size_label(level['bytes'])}: {level['GB/s']:.0f} GB/s")
    fastest = max(r["F.linear GFLOP/s"] for r in results)
    ax.axhline(fastest, color="k", linestyle=":", linewidth=1, label=f"fastest F.linear: {fastest:.0f} GFLOP/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(min(rates) / 2, max(rates) * 2)
    ax.set_xlabel("arithmetic intensity: useful flops / bytes of (packed) weight, x and y")
    ax.set_ylabel("achieved GFLOP/s (useful flops)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    save_figure(plt, fig, f"Sparse linear roofline, fp32 - {describe(info)}", path)


# ---------------------------------------------------------------------------------------------
# --device cuda

GPU = "cuda"  # a module constant so that tests can run this code path with the CPU standing in
CUDA_DTYPES = (torch.float32, torch.float16)
CUDA_CANDIDATES = ("dense", "torch CSR", "torchprune", "2:4")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11}


def within_bound(out, x, w, dtype, accumulate):
    """Raises unless |out - x wᵀ| <= gamma_K(u_acc) |x| |w|ᵀ + u_out |x wᵀ| elementwise (the
    deterministic bound of a dot product of K terms, in float64 on the same rounded inputs), with
    u_acc the unit roundoff of the accumulation: fp32 for ours and cuBLAS, the data type for
    libraries that may accumulate in it (cuSPARSE and cuSPARSELt in fp16)."""
    k = x.shape[1]
    u_acc, u_out = UNIT_ROUNDOFF[accumulate], UNIT_ROUNDOFF[dtype]
    if k * u_acc >= 1:  # the bound says nothing: K fp16 sums can lose every bit
        if not torch.isfinite(out).all():
            raise AssertionError("not finite")
        return
    gamma = k * u_acc / (1 - k * u_acc)
    reference = F.linear(x.double(), w.double())
    bound = gamma * F.linear(x.double().abs(), w.double().abs()) + u_out * reference.abs()
    excess = ((out.double() - reference).abs() - bound).max().item()
    if not excess <= 0:
        raise AssertionError(f"off the float64 product by {excess:.3g} more than the error bound")


def make_cuda_runners(shape, batch, sparsity, dtype, seed=0):
    """The GPU candidates that work here, as closures, and {candidate: why not} for the others.
    Each candidate is run once and checked against a float64 reference before it is timed."""
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    weight = torch.randn(shape, generator=generator)
    weight[~random_mask(shape, sparsity, generator)] = 0.0
    x = torch.randn(batch, in_features, generator=generator)
    packed = _ops.pack_csr(weight)  # packed on the CPU, then moved
    w, xd = weight.to(GPU, dtype), x.to(GPU, dtype)

    def build_csr():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            csr = w.to_sparse_csr()
        bias_column = torch.zeros(out_features, 1, dtype=dtype, device=GPU)
        return lambda: torch.addmm(bias_column, csr, xd.t()).t()

    def build_ours():
        row_ptr, col_idx, values = (t.to(GPU) for t in packed)
        values = values.to(dtype)
        return lambda: _ops.sparse_linear(xd, row_ptr, col_idx, values, in_features)

    builders = {"dense": lambda: (lambda: F.linear(xd, w)), "torch CSR": build_csr, "torchprune": build_ours}
    runners, missing = {}, {}
    for name, build in builders.items():
        try:
            run = build()
            within_bound(run(), xd, w, dtype, dtype if name == "torch CSR" else torch.float32)
            runners[name] = run
        except Exception as error:  # not supported here, or wrong: reported, not timed
            missing[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    sparse24, dense24 = semi_structured(w)
    if sparse24 is None:
        missing["2:4"] = dense24
    else:
        try:
            run = lambda: F.linear(xd, sparse24)  # noqa: E731
            within_bound(run(), xd, dense24, dtype, dtype)
            runners["2:4"] = run
        except Exception as error:
            missing["2:4"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return runners, missing


def main_cuda(args, grid) -> None:
    info = gpu_info()
    timer = getattr(args, "timer", "events")
    dtypes = getattr(args, "dtypes", CUDA_DTYPES)
    print(f"machine: {describe_gpu(info)}; " + " and ".join(str(d)[6:] for d in dtypes))
    how = ("each sample one replay of 20 calls captured in a CUDA graph: GPU time per call, no host launch"
           if timer == "graph" else "CUDA events around each call: host launch included")
    print(f"medians of {args.repeats} interleaved repeats ({how}); speedup = other time / torchprune time;"
          " 2:4 = dense time / 2:4 time (its own 50% weight)\n")
    header = (f"{'shape':>10} {'batch':>5} {'dtype':>7} {'sparsity':>8} {'dense ms':>9} {'CSR ms':>8} "
              f"{'tp ms':>8} {'2:4 ms':>8} {'vs dense':>8} {'vs CSR':>7} {'2:4 vs dense':>12}")
    print(header)
    print("-" * len(header))
    results, notes = [], {}
    for dtype in dtypes:
        for shape in grid["shapes"]:
            for batch in grid["batches"]:
                for sparsity in grid["sparsities"]:
                    runners, missing = make_cuda_runners(shape, batch, sparsity, dtype)
                    for name, why in missing.items():
                        notes.setdefault(f"{name} {str(dtype)[6:]}", why)
                    if timer == "graph":
                        seconds, per_call = time_cuda_graph(runners, args.repeats)
                        for name, why in per_call.items():
                            notes.setdefault(f"{name} {str(dtype)[6:]} not in a graph (timed per call)", why)
                    else:
                        seconds = time_cuda(runners, args.repeats)
                    med = {k: v * 1e3 for k, v in seconds.items()}
                    row = {"out_features": shape[0], "in_features": shape[1], "batch": batch,
                           "dtype": str(dtype)[6:], "sparsity": sparsity,
                           **{f"{k} ms": med.get(k) for k in CUDA_CANDIDATES}, "n/a": missing}
                    row["speedup vs dense"] = ratio(med.get("dense"), med.get("torchprune"))
                    row["speedup vs torch CSR"] = ratio(med.get("torch CSR"), med.get("torchprune"))
                    row["torch CSR vs dense"] = ratio(med.get("dense"), med.get("torch CSR"))
                    row["2:4 vs dense"] = ratio(med.get("dense"), med.get("2:4"))
                    results.append(row)
                    print(f"{shape[0]:>4}x{shape[1]:<5} {batch:>5} {row['dtype']:>7} {sparsity:>8.2f} "
                          f"{fmt_ms(row['dense ms']):>9} {fmt_ms(row['torch CSR ms']):>8} "
                          f"{fmt_ms(row['torchprune ms']):>8} {fmt_ms(row['2:4 ms']):>8} "
                          f"{fmt_ratio(row['speedup vs dense']):>8} {fmt_ratio(row['speedup vs torch CSR']):>7} "
                          f"{fmt_ratio(row['2:4 vs dense']):>12}")
    for what, why in notes.items():
        print(f"n/a: {what}: {why}")
    even = {}
    for dtype in sorted({r["dtype"] for r in results}):
        rows = [r for r in results if r["dtype"] == dtype and r["speedup vs dense"] is not None]
        even[dtype] = break_even(rows, "batch", "speedup vs dense") if rows else {}
        print(f"break-even sparsity vs dense, {dtype} (faster in every shape from there up): "
              + ", ".join(f"batch {b}: {s if s is not None else 'never'}" for b, s in even[dtype].items()))
    name = result_name(args, "cuda")
    write_json(os.path.join(args.out, name + ".json"),
               {"machine": info, "dtypes": [str(d)[6:] for d in dtypes], "repeats": args.repeats, "timer": timer,
                "results": results, "break_even": even, "n/a": notes})
    plot_cuda(results, os.path.join(args.out, name + ".png"), info)
    print(f"\nwrote {args.out}/{name}.json and {name}.png")


def fmt_ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def plot_cuda(results, path, info) -> None:
    """One panel per (dtype, batch): torchprune and torch CSR over dense against sparsity, per
    shape; 2:4 over dense as a star at s = 0.5."""
    plt = pyplot()
    if plt is None:
        return
    dtypes = sorted({r["dtype"] for r in results})
    batches = sorted({r["batch"] for r in results})
    shapes = sorted({(r["out_features"], r["in_features"]) for r in results})
    fig, axes = plt.subplots(len(dtypes), len(batches), figsize=(5 * len(batches), 4.5 * len(dtypes)), squeeze=False)
    sparsities = np.linspace(min(0.5, min(r["sparsity"] for r in results)), max(r["sparsity"] for r in results), 50)
    for row_axes, dtype in zip(axes, dtypes):
        for ax, batch in zip(row_axes, batches):
            for i, shape in enumerate(shapes):
                rows = sorted((r for r in results if r["dtype"] == dtype and r["batch"] == batch
                               and (r["out_features"], r["in_features"]) == shape), key=lambda r: r["sparsity"])
                color, label = f"C{i}", f"{shape[0]}x{shape[1]}"
                for key, style, who in (("speedup vs dense", "o-", "torchprune"),
                                        ("torch CSR vs dense", "x:", "torch CSR")):
                    pts = [(r["sparsity"], r[key]) for r in rows if r[key] is not None]
                    if pts:
                        ax.plot(*zip(*pts), style, color=color, label=f"{who} {label}")
                twofour = [r["2:4 vs dense"] for r in rows if r["2:4 vs dense"] is not None]
                if twofour:
                    ax.plot([0.5], [float(np.median(twofour))], "*", color=color, markersize=10, label=f"2:4 {label}")
            speedup_axis(ax, sparsities, batch, f"speedup over dense cuBLAS, {dtype}")
    save_figure(plt, fig, f"Sparse linear on the GPU - {describe_gpu(info)}", path)


if __name__ == "__main__":
    main()
