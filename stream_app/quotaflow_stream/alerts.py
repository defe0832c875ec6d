"""Soft budgets: one event when a key's usage crosses a fraction of a limit, once per period.

A policy lists ``alerts: [0.5, 0.8, 1.0]``. Each time the worker publishes a key's state it
compares every limit of that policy with those fractions; a threshold reached for the first
time in the limit's current period (the window-aligned interval it is in: the UTC minute, hour
or day, or the billing month in the policy's time zone) becomes one event on
``quotaflow.alerts``. Its ``unit`` says what ``used`` and ``limit_value`` count: for ``cost``,
integer micro-dollars. Which thresholds have fired is kept in the
key's table entry (``al``: ``"<limit>@<threshold>"`` -> period start), so it is saved with the
counts and survives restarts and takeovers.

The event goes out before the mark is saved: a worker killed in between leaves the next owner
to fire it again, with the *same id* (a hash of key, limit, period and threshold), so delivery
is at least once and receivers drop repeats by id (``quotaflow alerts forward`` does). Marking
first would lose the alert in the same crash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from quotaflow.policies import KEY_SCOPE, PolicySet
from quotaflow.state import QuotaState
from quotaflow.windows import MONTH, month_period, window_start


def alert_id(key: str, limit: str, period_start: float, threshold: float) -> str:
    """The same alert always has the same id, whichever worker fires it how often."""
    text = f"{key}\x00{limit}\x00{period_start:.0f}\x00{threshold:g}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def crossed(
    state: QuotaState, policies: PolicySet, fired: dict[str, float], now: float
) -> Iterator[dict[str, Any]]:
    """The alert events ``state`` raises at ``now``; ``fired`` (the entry's marks) is updated
    for each. Limits of policies without ``alerts`` cost one dict lookup."""
    for status in state.limits:
        policy = policies.get(state.scope_policies.get(status.scope, ""))
        if policy is None or not policy.alerts:
            continue
        spec = policy.spec_named(status.name)
        if spec is None:
            continue
        limit = status.name if status.scope == KEY_SCOPE else f"{status.scope}/{status.name}"
        if spec.window == MONTH:  # the billing month, in the policy's time zone
            period, period_end = month_period(now, policy.timezone)
        else:
            period = float(window_start(now, spec.window))
            period_end = period + spec.window
        for threshold in policy.alerts:
            if status.used < threshold * spec.limit:
                break  # thresholds ascend
            mark = f"{limit}@{threshold:g}"
            if fired.get(mark) == period:
                continue
            fired[mark] = period
            yield {
                "id": alert_id(state.key, limit, period, threshold),
                "key": state.key,
                "limit": limit,
                "policy": policy.name,
                "window": spec.window,
                "period": {"start": period, "end": period_end},
                "unit": spec.unit,
                "used": status.used,
                "limit_value": spec.limit,
                "threshold": threshold,
                "time": now,
            }
