"""Command line: ``python -m torchprune demo|compress|bench ...``.

* ``demo [--out DIR] [--quick] [--seed N] [--threads N]``: ships in the package.
* ``compress MODEL [--sparsity S ...] [--method M] [--recover-steps N] [--text FILE] [--out DIR] ...``:
  prune a pretrained model, recover it by distillation, sparsify it and measure it
  (`torchprune.compress.command`); ships in the package.
* ``bench NAME [args...]``: the benchmarks live in the source checkout, not in the package; this
  runs ``benchmarks/run.py NAME [args...]`` from the checkout this package was imported from, with
  the same interpreter, and refuses (exit status 1) where there is none (an installed wheel).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional

from . import demo
from .compress import command as compress

#: The source checkout this package was imported from (if it is one), and its benchmark launcher.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_LAUNCHER = os.path.join(CHECKOUT, "benchmarks", "run.py")


def bench(args: List[str]) -> int:
    """Runs ``benchmarks/run.py`` with ``args`` (its exit code), or says where the benchmarks are (1)."""
    if not os.path.isfile(BENCH_LAUNCHER):
        print(f"the benchmarks live in torchprune's source checkout, not in the installed package (no "
              f"{BENCH_LAUNCHER}): in a clone of the repository, run python benchmarks/run.py NAME", file=sys.stderr)
        return 1
    # The checkout first on the scripts' path: they import this torchprune, installed or not.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [CHECKOUT, os.environ.get("PYTHONPATH")])))
    return subprocess.call([sys.executable, BENCH_LAUNCHER, *args], env=env)


def main(argv: Optional[List[str]] = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) and runs the command; its exit code."""
    parser = argparse.ArgumentParser(prog="python -m torchprune", description="torchprune command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser("demo",
                                      help="prune an MLP and a CNN trained on handwritten digits; writes a report")
    demo.add_arguments(demo_parser)
    compress_parser = commands.add_parser(
        "compress", help="prune a pretrained model, recover it by distillation, sparsify and measure it",
        description=compress.__doc__.split("\n\n")[0].replace("``", ""))
    compress.add_arguments(compress_parser)
    bench_parser = commands.add_parser(
        "bench", help="run a benchmark of the source checkout: bench NAME [args...]",
        description="Runs benchmarks/run.py NAME [args...] of the source checkout with this interpreter, "
                    "e.g. `bench oneshot --quick`. `bench NAME --help` shows the launcher's options and the "
                    "names; options it does not know go on to the benchmark script.")
    bench_parser.add_argument("launcher_args", nargs=argparse.REMAINDER, metavar="NAME [args...]",
                              help="passed on to benchmarks/run.py")
    args = parser.parse_args(argv)
    if args.command == "bench":
        if not args.launcher_args:
            bench_parser.error("NAME is missing, e.g. python -m torchprune bench oneshot --quick")
        return bench(args.launcher_args)
    if args.command == "compress":
        return compress.run(args)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out must be a directory, got the file {args.out!r}")
    demo.run(out=args.out, quick=args.quick, seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
