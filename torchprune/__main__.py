"""Command line: ``python -m torchprune demo [--seed N] [--sparsity S] ...``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import demo


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchprune", description="torchprune command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser("demo", help="train, prune and fine-tune an MLP on handwritten digits")
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if not 0 <= args.sparsity < 1:
            parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
        if args.epochs < 1 or args.finetune_epochs < 0:
            parser.error("--epochs must be >= 1 and --finetune-epochs >= 0")
        demo.run(seed=args.seed, target=args.sparsity, epochs=args.epochs, finetune_epochs=args.finetune_epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
