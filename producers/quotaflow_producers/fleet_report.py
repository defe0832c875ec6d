"""What a fleet simulation measured: pure functions over the instances' logs, no I/O.

Ground truth is the merged log of every admission in the fleet (wall-clock time of the call and
its size). Against it:

- **overshoot**: the most the fleet admitted in any sliding window of the limit's length
  (evaluated at every admission, where the maximum occurs), over the limit;
- **under-admission**: the limit the fleet left unused although it offered more, averaged over
  the full windows of the run (sliding, sampled each second, ending at least one window length
  after the start); and **in the worst window**: the most left unused by any full window past
  the run's first window (the mean hides it: the first minute's burst and its aftermath);
- **blocked with budget**: the share of denials issued while more than the call plus 1 % of the
  limit was still free in the true sliding window (the 1 % keeps the rounding of shares out);
- **the exact limiter's worst window**: the same measure for a reference limiter, central and
  exact (a sliding log, no lag of any kind), fed the same offered calls in the same order. A
  fleet that wants several times its limit spends it in a burst early in each window and again
  as it frees, and a random dip in demand while budget frees leaves some of it unspent: that
  part belongs to the load, and the reference shows how much. What quotaflow leaves unused
  beyond it is its own cost.
- **propagation**: from a record's production (the state's watermark) to the moment the last
  instance applied the state that includes it, for the states that bring a key near its limit.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from quotaflow.stats import percentile

#: A denial counts as "blocked with budget" only if this much of the limit (plus the call) was
#: still free: shares round down and a few units are always in flight.
BLOCKED_TOLERANCE = 0.01


@dataclass(frozen=True)
class Calls:
    """One key's calls over the run, in time order: admitted (time, size) and denied ones."""

    admitted_at: Sequence[float]
    admitted_size: Sequence[int]
    denied_at: Sequence[float]
    denied_size: Sequence[int]

    @classmethod
    def of(
        cls, admitted: Sequence[tuple[float, int]], denied: Sequence[tuple[float, int]]
    ) -> Calls:
        """From ``(time, size)`` pairs, each list in time order."""
        return cls(
            admitted_at=[a[0] for a in admitted],
            admitted_size=[a[1] for a in admitted],
            denied_at=[d[0] for d in denied],
            denied_size=[d[1] for d in denied],
        )


def sliding_totals(at: Sequence[float], size: Sequence[int], window: float) -> list[int]:
    """For each admission, the total admitted in the window ``(t - window, t]`` ending at it."""
    prefix = [0, *accumulate(size)]
    out = []
    for i, t in enumerate(at):
        first = bisect_right(at, t - window)
        last = bisect_right(at, t, lo=i)
        out.append(prefix[last] - prefix[first])
    return out


def overshoot_pct(calls: Calls, limit: int, window: float) -> float:
    """How far the busiest sliding window went over ``limit``, in % of it (0 if never over)."""
    totals = sliding_totals(calls.admitted_at, calls.admitted_size, window)
    peak = max(totals, default=0)
    return max(peak - limit, 0) / limit * 100


def unused_pcts(
    calls: Calls, limit: int, window: float, first_end: float, ended: float
) -> list[float]:
    """Unused share of ``limit`` (%) of each full sliding window ending between ``first_end``
    and ``ended``, sampled each second."""
    prefix = [0, *accumulate(calls.admitted_size)]
    samples = []
    t = first_end
    while t <= ended:
        first = bisect_right(calls.admitted_at, t - window)
        last = bisect_right(calls.admitted_at, t)
        used = prefix[last] - prefix[first]
        samples.append(max(limit - used, 0) / limit * 100)
        t += 1.0
    return samples


def under_admission_pct(
    calls: Calls, limit: int, window: float, started: float, ended: float
) -> float | None:
    """Mean unused share of ``limit`` (%) over full sliding windows, sampled each second; None
    when the run was shorter than one window."""
    samples = unused_pcts(calls, limit, window, started + window, ended)
    return sum(samples) / len(samples) if samples else None


def worst_window_under_admission_pct(
    calls: Calls, limit: int, window: float, started: float, ended: float
) -> float | None:
    """The most a full window left unused, among windows that begin once the run's first
    window is over (steady state); None when the run was shorter than two windows."""
    samples = unused_pcts(calls, limit, window, started + 2 * window, ended)
    return max(samples) if samples else None


def exact_limiter(calls: Calls, limit: int, window: float) -> Calls:
    """What a central limiter counting every call exactly (a sliding log) would have admitted
    of the same offered calls, admitted and denied alike, taken in time order."""
    offered = sorted(
        [
            *zip(calls.admitted_at, calls.admitted_size, strict=True),
            *zip(calls.denied_at, calls.denied_size, strict=True),
        ]
    )
    live: deque[tuple[float, int]] = deque()  # admitted calls still in the window
    used = 0
    admitted: list[tuple[float, int]] = []
    denied: list[tuple[float, int]] = []
    for at, size in offered:
        while live and live[0][0] <= at - window:
            used -= live.popleft()[1]
        if used + size <= limit:
            live.append((at, size))
            used += size
            admitted.append((at, size))
        else:
            denied.append((at, size))
    return Calls.of(admitted, denied)


def blocked_with_budget_pct(calls: Calls, limit: int, window: float) -> float | None:
    """% of denials made while the true sliding window still had room for the call plus
    :data:`BLOCKED_TOLERANCE` of the limit; None without denials."""
    if not calls.denied_at:
        return None
    prefix = [0, *accumulate(calls.admitted_size)]
    at = calls.admitted_at
    slack = BLOCKED_TOLERANCE * limit
    wrong = 0
    for t, want in zip(calls.denied_at, calls.denied_size, strict=True):
        used = prefix[bisect_right(at, t)] - prefix[bisect_right(at, t - window)]
        if used + want + slack <= limit:
            wrong += 1
    return wrong / len(calls.denied_at) * 100


def propagation_ms(
    applied: dict[tuple[str, float], list[float]],
    watermarks: dict[tuple[str, float], float],
    instances: int,
) -> list[float]:
    """Per state seen by every instance: last apply time minus the state's watermark, in ms
    (the sum of its two :func:`propagation_stages_ms`)."""
    to_publish, to_apply = propagation_stages_ms(applied, watermarks, instances)
    return [sum(stages) for stages in zip(to_publish, to_apply, strict=True)]


def propagation_stages_ms(
    applied: dict[tuple[str, float], list[float]],
    watermarks: dict[tuple[str, float], float],
    instances: int,
) -> tuple[list[float], list[float]]:
    """:func:`propagation_ms` in its two stages, per state seen by every instance: the record
    produced to the worker publishing the state (emitter flush, broker, worker fetch, fold,
    publication tick) and the state published to the last instance applying it (broker,
    follower fetch, apply). States are keyed by ``(key, published_at)``."""
    to_publish, to_apply = [], []
    for (key, published), times in applied.items():
        if len(times) == instances:
            to_publish.append((published - watermarks[(key, published)]) * 1000)
            to_apply.append((max(times) - published) * 1000)
    return to_publish, to_apply


def summarize(values: Sequence[float], digits: int = 1) -> dict[str, Any]:
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return {
        "count": len(values),
        "p50": None if p50 is None else round(p50, digits),
        "p99": None if p99 is None else round(p99, digits),
    }
