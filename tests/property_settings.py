"""Hypothesis settings shared by the property-based tests (test_properties_*.py): reproducible
for CI (derandomized, no example database, no deadline) with a bounded number of examples."""

import os

from hypothesis import HealthCheck, Phase

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def examples(count: int) -> int:
    """``count`` examples, times $TORCHPRUNE_PROPERTY_SCALE (default 1; e.g. 20 for a long local
    search; still derandomized)."""
    return max(1, round(count * float(os.environ.get("TORCHPRUNE_PROPERTY_SCALE", "1"))))
