"""``_per_month`` limits: the calendar billing period in the policy's time zone, counted by the
worker from its day buckets as they roll out and followed by the SDK, reset when the next
month begins."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.cache import QuotaCache
from quotaflow.policies import parse_policies
from quotaflow.record import WireRecord
from quotaflow.state import QuotaState
from quotaflow.windows import DAY, MONTH, Months, month_period
from quotaflow_stream.aggregate import fold_records, month_field
from quotaflow_stream.alerts import crossed
from quotaflow_stream.evaluate import evaluate, scopes_for


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("ts", "zone", "start", "end"),
    [
        (utc(2026, 12, 2, 5), "UTC", utc(2026, 12, 1), utc(2027, 1, 1)),
        # Paris is UTC+1 in winter: December begins at 23:00 UTC on November 30th
        (utc(2026, 11, 30, 23, 30), "Europe/Paris", utc(2026, 11, 30, 23), utc(2026, 12, 31, 23)),
        (utc(2026, 11, 30, 22, 59), "Europe/Paris", utc(2026, 10, 31, 23), utc(2026, 11, 30, 23)),
        # ... and UTC+2 in summer: the months either side of a change differ in length
        (utc(2026, 4, 10), "Europe/Paris", utc(2026, 3, 31, 22), utc(2026, 4, 30, 22)),
        (utc(2026, 3, 10), "Europe/Paris", utc(2026, 2, 28, 23), utc(2026, 3, 31, 22)),
        # a quarter-hour zone, and the year's turn
        (utc(2026, 12, 31, 18, 15), "Asia/Kathmandu",
         utc(2026, 12, 31, 18, 15), utc(2027, 1, 31, 18, 15)),
    ],
)  # fmt: skip
def test_a_month_runs_from_the_first_at_midnight_in_its_zone(
    ts: float, zone: str, start: float, end: float
) -> None:
    assert month_period(ts, zone) == (start, end)
    months = Months(zone)
    assert months(ts) == (start, end) and months(ts) is months.period  # remembered


POLICIES = parse_policies(
    {
        "policies": [
            {
                "name": "monthly",
                "keys": ["*"],
                "timezone": "Europe/Paris",
                "max_staleness": 10**9,
                "budget_shares": False,
                "alerts": [0.5],
                "limits": {"cost_per_month": 1000, "requests_per_month": 10**6},
            }
        ]
    }
)
ZONES = POLICIES.month_zones
T_END = utc(2026, 12, 3, 12)  # Paris's December began 3 days 13 hours before


def records(offsets: list[float]) -> list[WireRecord]:
    kept = sorted(offsets, reverse=True)
    return [
        WireRecord(
            id=f"r{i}",
            ts=T_END - back,
            key="k",
            model="m",
            source="elsewhere",
            prompt_tokens=10,
            cost_micros=1000 + i,
        )
        for i, back in enumerate(kept)
    ]


@settings(max_examples=40, deadline=None)
@given(
    offsets=st.lists(st.floats(min_value=0, max_value=6 * DAY), min_size=1, max_size=60),
    later=st.floats(min_value=0, max_value=3 * DAY),
)
def test_the_month_counts_everything_since_it_began_however_old(
    offsets: list[float], later: float
) -> None:
    """Records over six days, across the month's start in Paris: the worker's month count
    (rolled-out day buckets plus those since) and the SDK that follows it equal a recount of
    the records since the month began; older ones count in no month of theirs."""
    recs = records(offsets)
    entries: dict = {}
    for r in recs:  # one message each, in order: the entry is pruned as time goes on
        fold_records(entries, [r], scopes_for(POLICIES), 10.0, now=r.ts, zones=ZONES)
    now = T_END + later
    start, end = month_period(now, "Europe/Paris")
    expected = [r for r in recs if r.ts >= start]
    state = evaluate("k", entries["k"], POLICIES, now)
    status = {s.name: s for s in state.limits}
    assert status["requests_per_month"].used == len(expected)
    assert status["cost_per_month"].used == sum(r.cost_micros or 0 for r in expected)
    assert status["cost_per_month"].reset_at == end
    cache = QuotaCache(POLICIES, "me", clock=lambda: now)
    cache.mark_heard()
    cache.apply_state(QuotaState.from_json(state.to_json()))
    left = cache.check("k", "m", requests=0).remaining
    assert left["requests_per_month"] == 10**6 - len(expected)
    assert left["cost_per_month"] == max(10**9 - sum(r.cost_micros or 0 for r in expected), 0)
    # the rolled-out months keep only what may still be read
    rolled = entries["k"]["s"][""].get(month_field("Europe/Paris"), [])
    assert len(rolled) <= 2 * 7


def test_a_new_month_starts_from_nothing_in_the_sdk_too() -> None:
    """A state of November does not count in December, and own usage of November neither."""
    november = utc(2026, 11, 30, 22)  # 23:00 in Paris
    recs = records([T_END - november])
    entries: dict = {}
    fold_records(entries, recs, scopes_for(POLICIES), 10.0, now=november, zones=ZONES)
    state = evaluate("k", entries["k"], POLICIES, november)
    at = [november]
    cache = QuotaCache(POLICIES, "me", clock=lambda: at[0])
    cache.mark_heard()
    cache.apply_state(state)
    cache.add_usage("k", (november, "m", 1, 0, 0, 0, 0, 500))
    assert cache.check("k", "m", requests=0).remaining["cost_per_month"] == 10**9 - 1000 - 500
    at[0] = utc(2026, 11, 30, 23, 0, 1)  # 00:00:01 on December 1st in Paris
    d = cache.check("k", "m", cost_micros=10**9)
    assert d.allowed and d.remaining["cost_per_month"] == 0
    over = cache.check("k", "m", cost_micros=10**9 + 1)
    assert not over.allowed and over.reset_at == utc(2026, 12, 31, 23)


def test_a_monthly_alert_fires_once_in_its_billing_month() -> None:
    recs = [WireRecord(id="big", ts=T_END, key="k", model="m", source="s", cost_micros=600_000_000)]
    entries: dict = {}
    fold_records(entries, recs, scopes_for(POLICIES), 10.0, now=T_END, zones=ZONES)
    state = evaluate("k", entries["k"], POLICIES, T_END)
    marks: dict[str, float] = {}
    [event] = [e for e in crossed(state, POLICIES, marks, T_END) if e["limit"] == "cost_per_month"]
    assert event["period"] == {"start": utc(2026, 11, 30, 23), "end": utc(2026, 12, 31, 23)}
    assert (event["unit"], event["used"], event["limit_value"]) == ("cost", 600_000_000, 10**9)
    assert event["window"] == MONTH
    assert not [e for e in crossed(state, POLICIES, marks, T_END + DAY)], "once per month"
