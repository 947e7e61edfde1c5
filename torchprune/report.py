"""Moved to torchprune.analysis.report."""
from .analysis.report import *  # noqa: F401,F403  # shim: removed at integration
