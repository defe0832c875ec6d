"""The dashboard's summary from quota states (pure)."""

from __future__ import annotations

from quotaflow.state import LimitStatus, QuotaState, Totals
from quotaflow_stream.dashboard import summary

NOW = 1_700_000_000.0


def state(
    key: str,
    used: int,
    tokens_last_minute: int,
    throttled: bool = False,
    spent_minute: int = 0,
    spent_day: int = 0,
    budget: int = 10**6,
) -> QuotaState:
    return QuotaState(
        key=key,
        published_at=NOW - 2,
        watermark=NOW - 2,
        # (start, requests, prompt, completion, cached, images, cost, expiries)
        scopes={
            "": {
                60: (NOW, used, tokens_last_minute, 0, 0, 0, spent_minute, ()),
                86400: (NOW, used, tokens_last_minute, 0, 0, 0, spent_day, ()),
            }
        },
        scope_policies={"": "p"},
        limits=(
            LimitStatus("", "requests_per_minute", 10, used, max(10 - used, 0), NOW + 30),
            LimitStatus("", "cost_per_day", budget, spent_day, budget - spent_day, NOW + 60),
        ),
        throttled=throttled,
        denied_by="requests_per_minute" if throttled else None,
        retry_after=30.0 if throttled else 0.0,
        totals=Totals(used, used, tokens_last_minute, 0, spent_day * 3),
        models={"gpt-4o": Totals(used, used, tokens_last_minute, 0)},
    )


def test_summary_orders_keys_by_fullest_limit_and_lists_throttles() -> None:
    states = [state("calm", 2, 100), state("hot", 10, 900, throttled=True), state("idle", 0, 0)]
    s = summary(states, NOW, {"records": 12}, latencies_ms=[5.0, 7.0, 90.0])
    assert [k["key"] for k in s["keys"]] == ["hot", "calm", "idle"]
    assert s["keys"][0]["limits"][0]["percent"] == 100.0 and not s["keys"][0]["limits"][0]["money"]
    # the wait counts down from publication: 30 s then, 28 s now
    assert s["throttled"] == [
        {"key": "hot", "denied_by": "requests_per_minute", "retry_after": 28.0}
    ]
    assert [c["key"] for c in s["top_consumers"]] == ["hot", "calm"]
    assert s["models"] == {"gpt-4o": {"requests": 12, "tokens": 1000}}
    assert s["decision_latency_ms"] == {"p50": 7.0, "p99": 90.0, "count": 3}
    assert s["worker"] == {"records": 12} and s["key_count"] == 3
    assert summary(states, NOW, {}, top=1)["keys"][0]["key"] == "hot"


def test_spend_is_summed_in_micro_dollars_and_shown_in_dollars() -> None:
    states = [
        state("thrifty", 1, 10, spent_minute=1, spent_day=250_000),
        state("lavish", 1, 10, spent_minute=2, spent_day=900_001),
        state("free", 1, 10),
    ]
    s = summary(states, NOW, {})
    assert s["top_spenders"] == [
        {"key": "lavish", "last_day_usd": "0.900001", "total_usd": "2.700003"},
        {"key": "thrifty", "last_day_usd": "0.250000", "total_usd": "0.750000"},
    ]
    assert s["spend"] == {"last_minute_usd": "0.000003", "last_day_usd": "1.150001"}
    lavish = next(k for k in s["keys"] if k["key"] == "lavish")
    budget = next(lim for lim in lavish["limits"] if lim["name"] == "cost_per_day")
    assert budget["money"] and budget["percent"] == 90.0 and budget["used"] == 900_001


def test_keys_a_shadow_mode_policy_would_throttle_are_listed_not_throttled() -> None:
    from dataclasses import replace

    shadowed = replace(state("trial", 12, 10), shadow=("requests_per_minute",))
    s = summary([shadowed, state("calm", 2, 100)], NOW, {})
    assert s["shadow"] == [{"key": "trial", "limits": ["requests_per_minute"]}]
    assert s["throttled"] == [] and s["keys"][0]["shadow"] == ["requests_per_minute"]
