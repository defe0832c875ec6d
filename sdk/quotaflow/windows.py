"""Window arithmetic: pure functions over epoch seconds, shared by the SDK and the worker.

Limits are enforced over *sliding* windows, so a key cannot spend its limit at 0:59 and again at
1:00. Each window of ``W`` seconds is counted in buckets of ``b = W / SLIDE_BUCKETS[W]`` seconds
aligned to the Unix epoch; at time ``t`` the count is the sum of the buckets that start in
``[c - W, c]``, where ``c`` is the start of the bucket holding ``t``. Those buckets cover
``[c - W, c + b)``, which contains every sliding interval ``(t - W, t]``: the count is never
below the true sliding count, so the estimate never over-admits. It over-counts by at most the
usage in ``[c - W, t - W]`` (part of one bucket), so a bucket's usage frees at most ``b``
seconds later than a true sliding window would free it: at a steady saturated rate the
admitted throughput is at least ``W / (W + b)`` of the limit (99.8 % with 480 buckets).

Why a minute has 480 buckets (0.125 s), not 120: a fleet that wants more than its limit spends
it early in each window (5x demand: in the first 12 s), then spends each bucket's usage again
the moment it frees, so the burst recurs ``b`` later every window, and the 60 s window that
meets the gap misses ``b x load / 60`` of the limit (4.2 % at 0.5 s buckets, 1 % at 0.125 s).
Finer buckets cost memory only for keys busy in every one of them, and list more expiries in a
state (see :data:`quotaflow.state.STATE_EXPIRIES`).

``_per_month`` limits do not slide: a month is the calendar billing period, from the first of
the month at 00:00 in the policy's time zone to the next (:func:`month_period`). Its count is
everything in the period so far, and it resets when the next one begins.

Keeping the arithmetic here, free of I/O and state, lets tests cover every edge without a broker.
The hot paths (the SDK's ``check()``, the worker's fold and its evaluation) inline some of these
functions; ``tests/unit/test_window_contract.py`` holds every inlined copy to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo

MINUTE: Final = 60
HOUR: Final = 3600
DAY: Final = 86400
#: The calendar month's window id (its longest length): a month is a billing period in a time
#: zone, not a sliding window (see :func:`month_period`).
MONTH: Final = 31 * DAY

#: Window names used in policy fields (``tokens_per_minute``) mapped to their window ids: the
#: length in seconds of a sliding window, or :data:`MONTH`.
WINDOW_SECONDS: Final[dict[str, int]] = {"minute": MINUTE, "hour": HOUR, "day": DAY, "month": MONTH}


#: Buckets per window length; a window slides in steps of ``size // buckets`` seconds.
SLIDE_BUCKETS: Final[dict[int, int]] = {MINUTE: 480, HOUR: 120, DAY: 96}


def month_period(ts: float, zone: str = "UTC") -> tuple[float, float]:
    """The billing month holding ``ts``: from the first of its month at 00:00 in ``zone`` (an
    IANA name) to the first of the next, as epoch seconds ``(start, end)``."""
    return _month_of(_month_index(ts, zone), zone)


def _month_index(ts: float, zone: str) -> int:
    local = datetime.fromtimestamp(ts, _zone(zone))
    return local.year * 12 + local.month - 1


@lru_cache(maxsize=4096)
def _month_of(index: int, zone: str) -> tuple[float, float]:
    tz = _zone(zone)
    year, month = divmod(index, 12)
    start = datetime(year, month + 1, 1, tzinfo=tz).timestamp()
    year, month = divmod(index + 1, 12)
    return start, datetime(year, month + 1, 1, tzinfo=tz).timestamp()


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


class Months:
    """:func:`month_period` in one zone with the current period remembered: on the request
    path a lookup is two comparisons (a fresh one costs ~2 us). Thread-safe: the period is one
    tuple, replaced whole."""

    __slots__ = ("period", "zone")

    def __init__(self, zone: str = "UTC") -> None:
        self.zone = zone
        self.period: tuple[float, float] = (0.0, 0.0)

    def __call__(self, ts: float) -> tuple[float, float]:
        period = self.period
        if period[0] <= ts < period[1]:
            return period
        period = self.period = month_period(ts, self.zone)
        return period


# one remembered period per zone, for the whole process (the SDK's checks, the worker's fold)
_MONTHS: dict[str, Months] = {}


def months_of(zone: str) -> Months:
    """The remembered billing months of ``zone`` (one :class:`Months` per zone and process)."""
    months = _MONTHS.get(zone)
    if months is None:
        months = _MONTHS[zone] = Months(zone)
    return months


def bucket_size(size: int) -> float:
    """Length in seconds of the buckets a ``size``-second window is counted in (binary
    fractions like 0.5, so bucket starts are exact floats)."""
    return size / SLIDE_BUCKETS.get(size, 60)


def bucket_start(ts: float, size: int) -> float:
    """Start of the bucket (of a ``size``-second window) that holds ``ts``."""
    b = bucket_size(size)
    return (ts // b) * b


def sliding_floor(now: float, size: int) -> float:
    """Oldest bucket start still counted at ``now``: buckets starting at or after it count."""
    return bucket_start(now, size) - size


def bucket_expires_at(start: float, size: int) -> float:
    """When a bucket starting at ``start`` stops counting: its usage frees at this moment."""
    return start + size + bucket_size(size)


def window_start(ts: float, size: int) -> int:
    """Start (inclusive) of the ``size``-second window that contains ``ts``."""
    return int(ts // size) * size


def window_end(ts: float, size: int) -> int:
    """End (exclusive) of the window that contains ``ts``: the moment its counters reset."""
    return window_start(ts, size) + size


def is_expired(start: float, size: int, watermark: float, grace: float) -> bool:
    """True when the bucket starting at ``start`` no longer counts in its window at ``watermark``
    (event time) even allowing ``grace`` seconds for late records: such records are late.

    Records that arrive a little late (network, retries, clock skew) still count, in the bucket
    they belong to, for as long as that bucket still counts plus ``grace``.
    """
    return bucket_expires_at(start, size) + grace <= watermark


def frees_at(
    used: float, allowed: int, frees: Iterable[tuple[float, float]], now: float, fallback: float
) -> float:
    """When usage ``used`` drops to ``allowed`` or below, as amounts free at their times
    (``frees``, ascending): the first time after ``now`` it does, else ``fallback``."""
    for at, amount in frees:
        used -= amount
        if at > now and used <= allowed:
            return float(at)
    return float(fallback)


def format_duration(seconds: float) -> str:
    """Render a duration the way OpenAI's reset headers do: ``6m0s``, ``1h2m3s``, ``350ms``."""
    if seconds < 0:
        seconds = 0.0
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    frac = seconds - whole
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    sec_text = f"{secs + frac:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{sec_text}"
    if minutes:
        return f"{minutes}m{sec_text}"
    return sec_text
