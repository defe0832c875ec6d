"""The immutable answer of :meth:`QuotaClient.check`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

Reason = Literal[
    "ok", "limit", "share", "no_policy", "stale_open", "stale_closed", "stale_local", "unpriced"
]


class Decision(NamedTuple):
    """Whether a call may proceed, and the budget around it. Immutable (a named tuple: it is
    built on every check, and a tuple is the cheapest immutable object Python builds).

    ``remaining`` maps each limit to what is left after this call would be admitted (names like
    ``tokens_per_minute``; model-scoped limits read ``gpt-4o/tokens_per_minute``). On a denial,
    ``limit`` names the ceiling that denied, ``retry_after`` is the wait in seconds and
    ``reset_at`` the epoch second when that limit's window resets. ``state_age`` is how old the
    stream's view behind this answer is (seconds), or ``None`` if no worker has been heard yet.
    On a ``limit`` denial, ``used``, ``ceiling`` and ``requested`` give that limit's figures.
    """

    allowed: bool
    key: str
    model: str | None
    reason: Reason
    limit: str | None
    policy: str | None
    remaining: Mapping[str, int]
    retry_after: float
    reset_at: float | None
    state_age: float | None
    used: int | None = None
    ceiling: int | None = None
    requested: int | None = None

    def __bool__(self) -> bool:
        return self.allowed
