"""Progress bars for the long loops (sensitivity sweeps, recovery): tqdm when it is installed.

tqdm is optional (the ``demo`` and ``test`` extras): without it the loops run without a bar.
"""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(total: int, label: str, initial: int = 0):
    """A tqdm bar of ``total`` steps starting at ``initial`` that disappears when closed, or None when
    tqdm is not installed (callers skip ``update``/``close`` then)."""
    try:
        from tqdm.auto import tqdm  # imported only when a bar is wanted
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=label, leave=False)
