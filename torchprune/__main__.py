"""Command line: ``python -m torchprune demo [--out DIR] [--quick] [--seed N] [--threads N]``.

Only what ships in the package runs from here; the benchmarks live in the source checkout and have
their own launcher, ``python benchmarks/run.py linear|conv|models [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import demo


def main(argv: Optional[List[str]] = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) and runs the command; its exit code."""
    parser = argparse.ArgumentParser(prog="python -m torchprune", description="torchprune command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser("demo",
                                      help="prune an MLP and a CNN trained on handwritten digits; writes a report")
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            parser.error(f"--out must be a directory, got the file {args.out!r}")
        demo.run(out=args.out, quick=args.quick, seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
