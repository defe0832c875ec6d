"""Soft-budget alerts in the publisher, with in-memory fakes: each threshold once per period,
marks saved with the entry (so a restarted worker does not fire them again), same ids when it
must. The path over a real broker and a worker kill -9 is in ``tests/e2e/test_alerts.py``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from quotaflow.ids import record_id
from quotaflow.policies import parse_policies
from quotaflow.record import WireRecord
from quotaflow.settings import WorkerSettings
from quotaflow_stream.alerts import alert_id
from quotaflow_stream.counters import Counters
from quotaflow_stream.evaluate import scopes_for
from quotaflow_stream.publisher import StatePublisher
from quotaflow_stream.store import AggregateStore
from tests.support.fakes import CHANGELOG, FakeOutput, FakeSnapshot, FakeTable, FakeTopic

NOW = 1_800_000_030.0  # 30 s into a minute
POLICIES = parse_policies(
    {
        "policies": [
            {
                "name": "soft",
                "keys": ["team-*"],
                "alerts": [1.0, 0.5, 0.8, 0.5],
                "limits": {"requests_per_minute": 10, "tokens_per_day": 1_000_000},
            },
            {"name": "quiet", "keys": ["other-*"], "limits": {"requests_per_minute": 10}},
        ]
    }
)


class Worker:
    """A store and a publisher over fakes, with a clock the test moves."""

    def __init__(self, table: FakeTable | None = None) -> None:
        self.now = NOW
        self.table, self.output = table or FakeTable(), FakeOutput()
        self.store = AggregateStore(
            self.table, 1, self.output, scopes_for=scopes_for(POLICIES), grace=10
        )
        self.counters = Counters()
        self.publisher = StatePublisher(
            WorkerSettings(), POLICIES, self.store, self.output, FakeSnapshot(), FakeTopic(),
            decisions_topic="decisions", alerts_topic="alerts", partitions=1,
            counters=self.counters, ready=lambda: True, clock=lambda: self.now,
            monotonic=lambda: self.tick,  # ticks far apart: none skipped for its share of time
        )  # fmt: skip
        self.n = 0
        self.tick = 0.0

    def use(self, key: str, calls: int, ts: float | None = None) -> None:
        recs = []
        for _ in range(calls):
            self.n += 1
            recs.append(WireRecord(id=record_id("cd" * 8, self.n), ts=ts or self.now, key=key,
                                   model="m", prompt_tokens=10, source="svc"))  # fmt: skip
        folded = self.store.fold(recs, self.now)
        self.publisher.changed(folded.touched, ["svc"], self.now)
        self.tick += 100
        asyncio.run(self.publisher.publish_dirty())

    def alerts(self) -> list[dict[str, Any]]:
        return [json.loads(v) for _, v, _ in self.output.to("alerts")]


def test_each_threshold_fires_once_in_its_period() -> None:
    w = Worker()
    w.use("team-a", 4)
    assert w.alerts() == []
    w.use("team-a", 1)  # 5 of 10: the 0.5 threshold
    [half] = w.alerts()
    assert (half["limit"], half["threshold"], half["used"], half["limit_value"]) == (
        "requests_per_minute", 0.5, 5, 10,
    )  # fmt: skip
    assert half["period"] == {"start": 1_800_000_000.0, "end": 1_800_000_060.0}
    assert half["id"] == alert_id("team-a", "requests_per_minute", 1_800_000_000.0, 0.5)
    w.use("team-a", 1)
    assert len(w.alerts()) == 1, "the same threshold does not fire twice in its period"
    w.use("team-a", 5)  # 11 of 10: 0.8 and 1.0 at once, in ascending order
    assert [a["threshold"] for a in w.alerts()] == [0.5, 0.8, 1.0]
    assert w.counters.alerts == 3
    # the next minute is a new period; the sliding count still holds most of the last one
    w.now += 60
    w.use("team-a", 1)
    fired = w.alerts()[3:]
    assert {a["period"]["start"] for a in fired} == {1_800_000_060.0}
    assert all(a["limit"] == "requests_per_minute" for a in fired)


def test_policies_without_alerts_fire_nothing() -> None:
    w = Worker()
    w.use("other-a", 12)
    assert w.alerts() == [] and "al" not in (w.store.get("other-a") or {})


def test_marks_are_saved_so_a_restarted_worker_does_not_fire_again() -> None:
    w = Worker()
    w.use("team-a", 6)
    assert len(w.alerts()) == 1
    assert "team-a" in w.store.unsaved
    asyncio.run(w.store.save())
    # a new worker recovering the changelog: what the first saved, it now loads
    table = FakeTable()
    for k, v, _ in w.output.to(CHANGELOG):
        if v:
            table.data[k] = v
    again = Worker(table)
    again.n = w.n
    again.use("team-a", 1)
    assert again.alerts() == [], "fired before the restart: not again"
    again.use("team-a", 2)  # 9 of 10
    assert [a["threshold"] for a in again.alerts()] == [0.8]


def test_a_crash_before_the_save_fires_again_with_the_same_id() -> None:
    """At least once: the mark was never saved, so the next owner sends it again, and the
    receiver can tell it is the same alert."""
    w = Worker()
    w.use("team-a", 6)
    [first] = w.alerts()
    # the changelog never got the mark; the next owner counts the same records again
    again = Worker()
    again.use("team-a", 6)
    [repeat] = again.alerts()
    assert repeat["id"] == first["id"]


@pytest.mark.parametrize("bad", [[0], [-0.5], [11], ["lots"]])
def test_alert_fractions_are_checked(bad: list[Any]) -> None:
    from quotaflow._exceptions import ConfigError

    doc = {"policies": [{"name": "p", "keys": ["k"], "alerts": bad,
                         "limits": {"requests_per_minute": 1}}]}  # fmt: skip
    with pytest.raises(ConfigError, match="alerts"):
        parse_policies(doc)


def test_alerts_follow_a_limit_changed_mid_period() -> None:
    """Lowered from 10 to 6 a minute with 5 used: the next publication measures against 6
    (0.8 crossed, not 0.5 again), with the new limit in the event."""
    w = Worker()
    w.use("team-a", 5)
    assert [a["threshold"] for a in w.alerts()] == [0.5]
    lowered = parse_policies({"policies": [{
        "name": "soft", "keys": ["team-*"], "alerts": [0.5, 0.8, 1.0],
        "limits": {"requests_per_minute": 6}}]})  # fmt: skip
    w.publisher.policies = lowered
    w.store.adopt(scopes_for(lowered), lowered.month_zones)
    w.publisher.changed({"team-a"}, ["svc"], w.now)
    w.tick += 100
    asyncio.run(w.publisher.publish_dirty())
    later = w.alerts()[1:]
    assert [(a["threshold"], a["used"], a["limit_value"]) for a in later] == [(0.8, 5, 6)]
