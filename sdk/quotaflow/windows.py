"""Window arithmetic: pure functions over epoch seconds, shared by the SDK and the worker.

Windows are tumbling and aligned to the Unix epoch (UTC), the way provider limits reset: a
minute window covers ``[60k, 60k + 60)``. Keeping the arithmetic here, free of I/O and state,
lets tests cover every edge without a broker.
"""

from __future__ import annotations

from typing import Final

MINUTE: Final = 60
HOUR: Final = 3600
DAY: Final = 86400

#: Window names used in policy fields (``tokens_per_minute``) mapped to their length in seconds.
WINDOW_SECONDS: Final[dict[str, int]] = {"minute": MINUTE, "hour": HOUR, "day": DAY}


def window_start(ts: float, size: int) -> int:
    """Start (inclusive) of the ``size``-second window that contains ``ts``."""
    return int(ts // size) * size


def window_end(ts: float, size: int) -> int:
    """End (exclusive) of the window that contains ``ts``: the moment its counters reset."""
    return window_start(ts, size) + size


def seconds_until_reset(now: float, size: int) -> float:
    """Seconds from ``now`` until the window containing ``now`` resets; always in ``(0, size]``."""
    return window_end(now, size) - now


def is_closed(start: int, size: int, watermark: float, grace: float) -> bool:
    """True when the window starting at ``start`` accepts no more records.

    A window stays open for ``grace`` seconds of event time after its end, so records that
    arrive a little late (network, retries, clock skew) still count in the window they belong to.
    """
    return start + size + grace <= watermark


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
