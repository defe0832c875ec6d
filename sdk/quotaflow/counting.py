"""What the decision cache counts, as pure functions: this process's unacknowledged usage of a
unit, what of a state's buckets has expired, and when a denied call fits again.

A unit's value is measure ``a`` plus ``sign`` x measure ``b`` (:data:`quotaflow.units.UNITS`);
pending calls are ``(ts, model, *measures)`` and a state's expiries ``(expires_at, *measures)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from heapq import merge
from typing import Any

from quotaflow.policies import KEY_SCOPE
from quotaflow.state import EXPIRIES, Expiry, WindowCounts
from quotaflow.units import UNIT_FORMS
from quotaflow.windows import bucket_size, frees_at

#: A call counted locally until the stream acknowledges it: ``(event ts, model, *measures)``.
Pending = tuple[Any, ...]


def pending_used(
    pending: Iterable[Pending], scope: str, a: int, b: int, sign: int, start: float
) -> int:
    """Unacknowledged local usage since ``start`` of the unit that is measure ``a`` plus
    ``sign`` x measure ``b`` (a LimitRow's form; pending entries hold them from index 2)."""
    a += 2
    b += 2
    used = 0
    for p in pending:
        if p[0] >= start and (scope == KEY_SCOPE or p[1] == scope):
            used += p[a] + sign * p[b] if sign else p[a]
    return used


def pending_of(pending: Iterable[Pending], scope: str, unit: int, start: float) -> int:
    """:func:`pending_used` of a unit by its index (off the request path)."""
    return pending_used(pending, scope, *UNIT_FORMS[unit], start)


def expired(expiries: Iterable[Expiry], unit: int, now: float) -> int:
    """Usage of one unit in a state's listed buckets that have expired by ``now``."""
    a, b, sign = UNIT_FORMS[unit]
    a += 1
    b += 1
    freed = 0.0
    for x in expiries:
        if x[0] > now:
            break
        freed += x[a] + sign * x[b] if sign else x[a]
    return int(freed)


def denied_until(
    windows: Mapping[int, WindowCounts] | None,
    pending: Iterable[Pending] | None,
    scope: str,
    unit: int,
    size: int,
    allowed: int,
    now: float,
) -> float:
    """When a denied call fits: usage of one limit, the stream's and this process's own,
    drops to ``allowed`` as its buckets expire (:func:`~quotaflow.windows.frees_at`).

    Every denial asks, so under overload (most calls denied) this is the request path too: the
    frees are merged lazily from the state's expiries and the pending calls (each in time
    order) and read only until enough has freed, usually the first bucket or two of dozens."""
    a, b, sign = UNIT_FORMS[unit]
    w = windows.get(size) if windows is not None else None
    used = 0
    listed: tuple[Expiry, ...] = ()
    if w is not None:
        used = w[a + 1] + sign * w[b + 1] if sign else w[a + 1]
        listed = w[EXPIRIES]
    # quotaflow.windows' sliding_floor and bucket_expires_at(bucket_start(ts)), inlined
    bucket = bucket_size(size)
    floor = (now // bucket) * bucket - size
    lasting = size + bucket
    own: list[tuple[float, float]] = []
    for p in pending or ():
        ts = p[0]
        if ts >= floor and (scope == KEY_SCOPE or p[1] == scope):
            amount = p[a + 2] + sign * p[b + 2] if sign else p[a + 2]
            used += amount
            own.append(((ts // bucket) * bucket + lasting, amount))
    own.sort()  # in time order already, unless the clock stepped back
    a += 1
    b += 1
    stream = ((x[0], x[a] + sign * x[b] if sign else x[a]) for x in listed)
    # nothing frees soon enough: everything counted now has freed a window later
    return frees_at(int(used), allowed, merge(stream, own), now, floor + size + lasting)
