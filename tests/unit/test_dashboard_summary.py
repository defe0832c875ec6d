"""The dashboard's summary from quota states (pure)."""

from __future__ import annotations

from quotaflow.state import LimitStatus, QuotaState, Totals
from quotaflow_stream.dashboard import summary

NOW = 1_700_000_000.0


def state(key: str, used: int, tokens_last_minute: int, throttled: bool = False) -> QuotaState:
    return QuotaState(
        key=key,
        published_at=NOW - 2,
        watermark=NOW - 2,
        scopes={"": {60: (NOW, used, tokens_last_minute, 0, ())}},
        scope_policies={"": "p"},
        limits=(LimitStatus("", "requests_per_minute", 10, used, max(10 - used, 0), NOW + 30),),
        throttled=throttled,
        denied_by="requests_per_minute" if throttled else None,
        retry_after=30.0 if throttled else 0.0,
        totals=Totals(used, used, tokens_last_minute, 0),
        models={"gpt-4o": Totals(used, used, tokens_last_minute, 0)},
    )


def test_summary_orders_keys_by_fullest_limit_and_lists_throttles() -> None:
    states = [state("calm", 2, 100), state("hot", 10, 900, throttled=True), state("idle", 0, 0)]
    s = summary(states, NOW, {"records": 12}, latencies_ms=[5.0, 7.0, 90.0])
    assert [k["key"] for k in s["keys"]] == ["hot", "calm", "idle"]
    assert s["keys"][0]["limits"][0]["percent"] == 100.0
    # the wait counts down from publication: 30 s then, 28 s now
    assert s["throttled"] == [
        {"key": "hot", "denied_by": "requests_per_minute", "retry_after": 28.0}
    ]
    assert [c["key"] for c in s["top_consumers"]] == ["hot", "calm"]
    assert s["models"] == {"gpt-4o": {"requests": 12, "tokens": 1000}}
    assert s["decision_latency_ms"] == {"p50": 7.0, "p99": 90.0, "count": 3}
    assert s["worker"] == {"records": 12} and s["key_count"] == 3
    assert summary(states, NOW, {}, top=1)["keys"][0]["key"] == "hot"
