from __future__ import annotations

import pytest

from quotaflow.policies import parse_policies
from quotaflow.record import UsageRecord
from quotaflow_stream.aggregate import add_records, current_bucket
from quotaflow_stream.evaluate import evaluate, scopes_for

M0 = 1_700_000_040  # a minute boundary

POLICIES = parse_policies(
    {
        "policies": [
            {"name": "key", "keys": ["k*"], "limits": {"requests_per_minute": 3}},
            {
                "name": "big",
                "keys": ["k*"],
                "models": ["big"],
                "limits": {"tokens_per_minute": 100},
            },
        ]
    }
)
SCOPES = scopes_for(POLICIES)


def rec(i: int, ts: float, model: str = "small", pt: int = 10, ct: int = 5, source: str = "a"):
    return UsageRecord(
        id=str(i), ts=ts, key="k1", model=model, prompt_tokens=pt, completion_tokens=ct,
        source=source,
    )  # fmt: skip


def test_records_fold_into_windows_and_totals() -> None:
    entry, late = add_records(None, [rec(1, M0 + 1), rec(2, M0 + 2, source="b")], SCOPES, 10)
    assert late == 0
    assert current_bucket(entry, "", 60, M0 + 30) == (M0, 2, 20, 10)
    assert entry["t"] == [2, 2, 20, 10]
    assert entry["src"] == {"a": M0 + 1, "b": M0 + 2}
    assert "small" not in entry["s"], "no model policy binds 'small'"


def test_model_scope_is_kept_where_a_model_policy_binds() -> None:
    entry, _ = add_records(None, [rec(1, M0 + 1, model="big", pt=60, ct=0)], SCOPES, 10)
    assert current_bucket(entry, "big", 60, M0 + 1) == (M0, 1, 60, 0)
    assert current_bucket(entry, "", 60, M0 + 1) == (M0, 1, 60, 0)


def test_input_entry_is_not_mutated() -> None:
    entry, _ = add_records(None, [rec(1, M0 + 1)], SCOPES, 10)
    snapshot = repr(entry)
    add_records(entry, [rec(2, M0 + 2)], SCOPES, 10)
    assert repr(entry) == snapshot


def test_late_within_grace_counts_in_its_window_beyond_grace_does_not() -> None:
    entry, _ = add_records(None, [rec(1, M0 + 65)], SCOPES, grace=10)  # next minute
    entry, late = add_records(entry, [rec(2, M0 + 59)], SCOPES, grace=10)  # 6 s late: ok
    assert late == 0 and current_bucket(entry, "", 60, M0 + 1)[1] == 1
    entry, _ = add_records(entry, [rec(3, M0 + 75)], SCOPES, grace=10)  # watermark M0+75
    entry, late = add_records(entry, [rec(4, M0 + 30)], SCOPES, grace=10)  # window closed
    assert late == 1 and entry["late"] == 1
    assert current_bucket(entry, "", 60, M0 + 1)[1] == 0, "closed window was pruned"
    assert current_bucket(entry, "", 3600, M0 + 1)[1] == 4, "the hour window is still open"
    assert entry["t"][0] == 4, "totals keep every record"


def test_evaluate_throttles_with_retry_after() -> None:
    entry, _ = add_records(None, [rec(i, M0 + i) for i in range(3)], SCOPES, 10)
    state = evaluate("k1", entry, POLICIES, now=M0 + 20)
    assert state.throttled and state.denied_by == "requests_per_minute"
    assert state.retry_after == pytest.approx(40)
    assert state.instances == 1 and state.totals.records == 3
    (lim,) = state.limits
    assert (lim.used, lim.remaining, lim.reset_at) == (3, 0, M0 + 60)


def test_evaluate_after_the_window_rolls_over_is_open() -> None:
    entry, _ = add_records(None, [rec(i, M0 + i) for i in range(3)], SCOPES, 10)
    state = evaluate("k1", entry, POLICIES, now=M0 + 61)
    assert not state.throttled and state.limits[0].used == 0


def test_state_json_round_trip() -> None:
    from quotaflow.state import QuotaState

    entry, _ = add_records(None, [rec(1, M0 + 1, model="big", pt=200)], SCOPES, 10)
    state = evaluate("k1", entry, POLICIES, now=M0 + 2)
    again = QuotaState.from_json(state.to_json())
    assert again == state
    assert again.denied_by == "big/tokens_per_minute"
