"""Command line: ``python -m torchprune demo [--out DIR] [--quick] [--seed N]`` and
``python -m torchprune bench linear|conv|models [--quick]``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import demo


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchprune", description="torchprune command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser("demo", help="prune an MLP and a CNN trained on handwritten digits; writes a report")
    demo.add_arguments(demo_parser)
    bench_parser = commands.add_parser("bench", help="run a benchmark script from benchmarks/ (source checkouts)")
    bench_parser.add_argument("which", choices=sorted(BENCHMARKS), help="which benchmark")
    bench_parser.add_argument("--quick", action="store_true", help="a few small cases only")
    bench_parser.add_argument("--repeats", type=int, default=None)
    bench_parser.add_argument("--threads", type=int, default=2)
    bench_parser.add_argument("--out", default=None, help="folder for the JSON and PNG (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return run_benchmark(parser, args)
    if args.command == "demo":
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            parser.error(f"--out must be a directory, got the file {args.out!r}")
        demo.run(out=args.out, quick=args.quick, seed=args.seed, threads=args.threads)
    return 0


#: ``python -m torchprune bench NAME`` runs ``benchmarks/bench_NAME.py`` of the source tree.
BENCHMARKS = {"linear": "bench_linear.py", "conv": "bench_conv.py", "models": "bench_models.py"}


def run_benchmark(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Runs one benchmark script in a fresh interpreter (its own thread settings); its exit code."""
    import os
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          BENCHMARKS[args.which])
    if not os.path.isfile(script):
        parser.error(f"{script} not found: the benchmarks ship with the source checkout, not the package")
    command = [sys.executable, script, "--threads", str(args.threads)]
    command += ["--quick"] if args.quick else []
    command += ["--repeats", str(args.repeats)] if args.repeats is not None else []
    command += ["--out", args.out] if args.out is not None else []
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
