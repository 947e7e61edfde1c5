"""Runs one benchmark script of this folder: ``python benchmarks/run.py NAME [--quick]``, NAME one of `BENCHMARKS`.

The benchmarks ship with the source checkout, not with the package; ``python -m torchprune bench
NAME`` finds this file there and runs it. Each script runs in a fresh interpreter, so that its
``--threads`` setting is its own; options this launcher does not know go to the script as they are
(``run.py oneshot --methods magnitude``); the exit code is the script's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional

#: ``python benchmarks/run.py NAME`` runs ``benchmarks/bench_NAME.py``.
BENCHMARKS = {"linear": "bench_linear.py", "conv": "bench_conv.py", "models": "bench_models.py",
              "oneshot": "bench_oneshot.py", "transformer": "bench_transformer.py", "auto": "bench_auto.py",
              "zoo": "bench_zoo.py"}
HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: Optional[List[str]] = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs the chosen script, returns its exit code."""
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description="run a torchprune benchmark script",
                                     epilog="other options go to the script as they are: see "
                                            "python benchmarks/bench_NAME.py --help")
    parser.add_argument("which", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--quick", action="store_true", help="a few small cases only")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for the JSON and PNG (default benchmarks/results)")
    args, passed_on = parser.parse_known_args(argv)
    command = [sys.executable, os.path.join(HERE, BENCHMARKS[args.which]), "--threads", str(args.threads)]
    command += ["--quick"] if args.quick else []
    command += ["--repeats", str(args.repeats)] if args.repeats is not None else []
    command += ["--out", args.out] if args.out is not None else []
    return subprocess.call(command + passed_on)


if __name__ == "__main__":
    sys.exit(main())
