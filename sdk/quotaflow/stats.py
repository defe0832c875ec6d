"""Percentiles for the figures quotaflow reports (benchmarks, simulator, dashboard, metrics)."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100, nearest rank) of ``values``; None if there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(math.ceil(q / 100 * len(ordered)) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]
