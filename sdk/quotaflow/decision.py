"""The immutable answer of :meth:`QuotaClient.check`."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal, NamedTuple

from quotaflow.units import MONEY, dollars

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
    Figures of money limits (``cost_per_day``) are integer micro-dollars: :meth:`explain` and
    :attr:`remaining_dollars` show them in dollars.
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
    #: The limit of a shadow-mode policy (``enforce: false``) that would have denied this
    #: call, which was admitted: the rollout of a new limit, measured before it binds.
    shadow: str | None = None
    #: The live policy version this decision was made by (None: the policy file).
    policy_version: int | None = None

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def by_budget(self) -> bool:
        """Denied by a money limit (a budget), not a rate limit."""
        return self.limit is not None and is_money_limit(self.limit)

    @property
    def remaining_dollars(self) -> dict[str, str]:
        """What is left of each money limit after this call, in dollars (``"24.580000"``)."""
        return {name: dollars(v) for name, v in self.remaining.items() if is_money_limit(name)}

    def explain(self) -> str:
        """The denial in words, money in dollars: ``cost_per_day of team-a: $24.990000 used of
        $25.000000, this call $0.020000; resets at 2026-12-03T00:00:00Z``."""
        if self.allowed:
            return f"{self.key}: allowed ({self.reason})"
        if self.reason != "limit" or self.limit is None:
            return f"{self.key}: denied ({self.reason}); retry after {self.retry_after:.1f}s"
        show = dollars if is_money_limit(self.limit) else str
        mark = "$" if is_money_limit(self.limit) else ""
        text = (
            f"{self.limit} of {self.key}: {mark}{show(self.used or 0)} used of "
            f"{mark}{show(self.ceiling or 0)}, this call {mark}{show(self.requested or 0)}"
        )
        if self.reset_at is not None:
            at = datetime.fromtimestamp(self.reset_at, UTC).isoformat(timespec="seconds")
            text += f"; resets at {at.replace('+00:00', 'Z')}"
        return text


def is_money_limit(name: str) -> bool:
    """Whether a limit name (``cost_per_day``, ``gpt-4o/cost_per_hour``) counts money."""
    return name.rpartition("/")[2].startswith(MONEY + "_per_")
