"""Window arithmetic: pure functions over epoch seconds, shared by the SDK and the worker.

Limits are enforced over *sliding* windows, so a key cannot spend its limit at 0:59 and again at
1:00. Each window of ``W`` seconds is counted in buckets of ``b = W / SLIDE_BUCKETS[W]`` seconds
aligned to the Unix epoch; at time ``t`` the count is the sum of the buckets that start in
``[c - W, c]``, where ``c`` is the start of the bucket holding ``t``. Those buckets cover
``[c - W, c + b)``, which contains every sliding interval ``(t - W, t]``: the count is never
below the true sliding count, so the estimate never over-admits. It over-counts by at most the
usage in ``[c - W, t - W]`` (part of one bucket), so a bucket's usage frees at most ``b``
seconds later than a true sliding window would free it: at a steady saturated rate the
admitted throughput is at least ``W / (W + b)`` of the limit (99.2 % with 120 buckets).

Keeping the arithmetic here, free of I/O and state, lets tests cover every edge without a broker.
The hot paths (the SDK's ``check()``, the worker's fold and its evaluation) inline some of these
functions; ``tests/unit/test_window_contract.py`` holds every inlined copy to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

MINUTE: Final = 60
HOUR: Final = 3600
DAY: Final = 86400

#: Window names used in policy fields (``tokens_per_minute``) mapped to their length in seconds.
WINDOW_SECONDS: Final[dict[str, int]] = {"minute": MINUTE, "hour": HOUR, "day": DAY}


#: Buckets per window length; a window slides in steps of ``size // buckets`` seconds.
SLIDE_BUCKETS: Final[dict[int, int]] = {MINUTE: 120, HOUR: 120, DAY: 96}


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
    used: int, allowed: int, frees: Iterable[tuple[float, int]], now: float, fallback: float
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
