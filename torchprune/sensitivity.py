"""Moved to torchprune.analysis.sensitivity."""
from .analysis.sensitivity import *  # noqa: F401,F403  # shim: removed at integration
