"""The immutable answer of :meth:`QuotaClient.check`."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

from quotaflow.headroom import remaining_of
from quotaflow.units import MONEY, dollars

if TYPE_CHECKING:
    from quotaflow.headroom import Headroom

Reason = Literal[
    "ok", "limit", "share", "no_policy", "stale_open", "stale_closed", "stale_local", "unpriced"
]


#: What an admission from the fast path keeps in place of its ``remaining`` map, built only
#: when read: ``(headroom, spent, spent_elsewhere, call)``, see
#: :func:`quotaflow.headroom.remaining_of`.
LazyRemaining = tuple["Headroom", tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class Decision(tuple[Any, ...]):
    """Whether a call may proceed, and the budget around it. Immutable: a tuple (it is built on
    every check, and a tuple is the cheapest immutable object Python builds), its fields read by
    name.

    ``remaining`` maps each limit to what is left after this call would be admitted (names like
    ``tokens_per_minute``; model-scoped limits read ``gpt-4o/tokens_per_minute``). On a denial,
    ``limit`` names the ceiling that denied, ``retry_after`` is the wait in seconds and
    ``reset_at`` the epoch second when that limit's window resets. ``state_age`` is how old the
    stream's view behind this answer is (seconds), or ``None`` if no worker has been heard yet.
    On a ``limit`` denial, ``used``, ``ceiling`` and ``requested`` give that limit's figures.
    ``shadow`` names the limit of a shadow-mode policy (``enforce: false``) that would have
    denied this call, which was admitted: the rollout of a new limit, measured before it binds.
    ``policy_version`` is the live policy version it was made by (None: the policy file).
    Figures of money limits (``cost_per_day``) are integer micro-dollars: :meth:`explain` and
    :attr:`remaining_dollars` show them in dollars.
    """

    __slots__ = ()

    _fields = (
        "allowed", "key", "model", "reason", "limit", "policy", "remaining", "retry_after",
        "reset_at", "state_age", "used", "ceiling", "requested", "shadow", "policy_version",
    )  # fmt: skip

    def __new__(
        cls,
        allowed: bool,
        key: str,
        model: str | None,
        reason: Reason,
        limit: str | None,
        policy: str | None,
        remaining: Mapping[str, int] | LazyRemaining,
        retry_after: float,
        reset_at: float | None,
        state_age: float | None,
        used: int | None = None,
        ceiling: int | None = None,
        requested: int | None = None,
        shadow: str | None = None,
        policy_version: int | None = None,
    ) -> Decision:
        # the fast path builds its admissions with tuple.__new__ directly (keywords cost)
        return tuple.__new__(cls, (
            allowed, key, model, reason, limit, policy, remaining, retry_after, reset_at,
            state_age, used, ceiling, requested, shadow, policy_version,
        ))  # fmt: skip

    if TYPE_CHECKING:
        allowed: bool
        key: str
        model: str | None
        reason: Reason
        limit: str | None
        policy: str | None
        retry_after: float
        reset_at: float | None
        state_age: float | None
        used: int | None
        ceiling: int | None
        requested: int | None
        shadow: str | None
        policy_version: int | None
    else:
        allowed = property(itemgetter(0))
        key = property(itemgetter(1))
        model = property(itemgetter(2))
        reason = property(itemgetter(3))
        limit = property(itemgetter(4))
        policy = property(itemgetter(5))
        retry_after = property(itemgetter(7))
        reset_at = property(itemgetter(8))
        state_age = property(itemgetter(9))
        used = property(itemgetter(10))
        ceiling = property(itemgetter(11))
        requested = property(itemgetter(12))
        shadow = property(itemgetter(13))
        policy_version = property(itemgetter(14))

    @property
    def remaining(self) -> Mapping[str, int]:
        found = self[6]
        if type(found) is tuple:  # a fast-path admission: built now, on reading
            return remaining_of(*found)
        return found

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"Decision({fields})"

    def _asdict(self) -> dict[str, Any]:
        """The fields by name, ``remaining`` built (as a named tuple's ``_asdict``)."""
        return {name: getattr(self, name) for name in self._fields}

    def __getnewargs__(self) -> tuple[object, ...]:
        return (*self[:6], dict(self.remaining), *self[7:])

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
