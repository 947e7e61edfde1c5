"""Old home of `Pruner` (now pruner.py)."""

from .pruner import Pruner  # noqa: F401  # shim: removed at integration (demo.py, demo_channels.py import it from here)
