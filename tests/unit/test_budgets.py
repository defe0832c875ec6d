"""Limits on every unit, and budgets in money: policies take dollars, ``check()`` prices the call
it is asked about, ``reserve()`` holds the worst case and ``settle()`` charges what the call
cost; the worker's evaluation and the SDK's check count every unit alike."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow import ConfigError, QuotaClient, QuotaExceeded, load_settings
from quotaflow.cache import QuotaCache
from quotaflow.policies import parse_policies
from quotaflow.record import WireRecord
from quotaflow.state import QuotaState
from quotaflow.transports import MemoryTransport
from quotaflow.units import MEASURES, UNITS, dollars, dollars_to_micros, unit_value, widen
from quotaflow.windows import bucket_start, sliding_floor
from quotaflow_stream.aggregate import fold_records
from quotaflow_stream.entry import STRIDE, upgraded
from quotaflow_stream.evaluate import evaluate, scopes_for, sliding_counts
from tests.support.prices import genai_cost

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


BUDGET = parse_policies(
    {
        "policies": [
            {
                "name": "budget",
                "keys": ["team-*"],
                "max_staleness": 600,
                "budget_shares": False,
                "limits": {"cost_per_day": 1.00},
            },
            {
                "name": "units",
                "keys": ["unit-*"],
                "max_staleness": 600,
                "budget_shares": False,
                "limits": {"images_per_minute": 3, "uncached_prompt_tokens_per_minute": 1000},
            },
        ]
    }
)


def quota(policies: object = BUDGET) -> QuotaClient:
    clock = Clock()
    client = QuotaClient(
        load_settings(client={"journal": False}), policies=policies,  # type: ignore[arg-type]
        transport=MemoryTransport(), follow=False, clock=clock,
    )  # fmt: skip
    client.open().cache.mark_heard()
    return client


def test_money_limits_are_dollars_in_the_document_and_micro_dollars_inside() -> None:
    spec = BUDGET.policies[0].spec_named("cost_per_day")
    assert spec is not None and (spec.limit, spec.unit, spec.money) == (1_000_000, "cost", True)
    assert (
        BUDGET.money
        and not parse_policies(
            {"policies": [{"name": "p", "default": True, "limits": {"requests_per_minute": 1}}]}
        ).money
    )
    assert dollars_to_micros("25.50") == 25_500_000 and dollars_to_micros(0.1) == 100_000
    assert dollars_to_micros("$3") == 3_000_000
    for bad, why in [(-1, ">= 0"), ("0.0000001", "micro-dollar"), ("ten", "not a dollar"),
                     (True, "not a dollar"), ("nan", "not a dollar")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"limits.cost_per_day: .*{why}"):
            parse_policies(
                {"policies": [{"name": "p", "default": True, "limits": {"cost_per_day": bad}}]}
            )
    assert dollars(1_234_567) == "1.234567" and dollars(-5) == "-0.000005"


def test_check_prices_the_call_and_a_budget_denial_speaks_dollars() -> None:
    q = quota()
    for _ in range(2):  # $0.35 each at gpt-4o's prices
        q.record("team-a", "gpt-4o", prompt_tokens=100_000, completion_tokens=10_000)
    assert q.cache.pending_count("team-a") == 2
    d = q.check("team-a", "gpt-4o", prompt_tokens=100_000, completion_tokens=10_000)
    assert not d.allowed and d.limit == "cost_per_day" and d.by_budget
    assert (d.used, d.ceiling, d.requested) == (
        700_000,
        1_000_000,
        genai_cost("gpt-4o", 100_000, 10_000),
    )
    assert "$0.700000 used of $1.000000, this call $0.350000; resets at" in d.explain()
    ok = q.check("team-a", "gpt-4o", prompt_tokens=50_000, completion_tokens=10_000)
    expected_left = 1_000_000 - 700_000 - genai_cost("gpt-4o", 50_000, 10_000)
    assert ok.allowed and ok.remaining["cost_per_day"] == expected_left
    assert ok.remaining_dollars == {"cost_per_day": dollars(expected_left)}
    # a given cost is taken as it is: exactly what is left fits, a micro-dollar more does not
    assert q.check("team-a", "gpt-4o", cost_micros=300_000).allowed
    assert not q.check("team-a", "gpt-4o", cost_micros=300_001).allowed
    q.close()


def test_reserve_holds_the_worst_case_and_settle_charges_what_the_call_cost() -> None:
    q = quota()
    held = q.reserve("team-a", "gpt-4o", prompt_tokens=100_000, max_output_tokens=60_000)
    with pytest.raises(QuotaExceeded, match=r"cost_per_day.*\$0\.250000") as denied:
        q.reserve("team-a", "gpt-4o", prompt_tokens=20_000, max_output_tokens=20_000)
    assert denied.value.decision is not None and denied.value.decision.used == 850_000
    record = held.settle({"prompt_tokens": 100_000, "completion_tokens": 1_000})
    assert record.cost_micros == genai_cost("gpt-4o", 100_000, 1_000)
    # the unused output's price came back
    again = q.reserve("team-a", "gpt-4o", prompt_tokens=20_000, max_output_tokens=20_000)
    assert again.decision.remaining["cost_per_day"] == 1_000_000 - 260_000 - 250_000
    again.release()
    q.close()


def test_uncached_prompt_tokens_leave_cache_reads_out_and_images_count_per_call() -> None:
    q = quota()
    q.record("unit-a", "gpt-4o", prompt_tokens=900, cached_prompt_tokens=800, images=2)
    assert q.check("unit-a", "gpt-4o", prompt_tokens=900).allowed  # 100 + 900 = 1000
    d = q.check("unit-a", "gpt-4o", prompt_tokens=901)
    assert (d.allowed, d.limit) == (False, "uncached_prompt_tokens_per_minute")
    assert q.check("unit-a", "gpt-4o", prompt_tokens=2000, cached_prompt_tokens=1500).allowed
    assert q.check("unit-a", "gpt-4o", images=1).allowed
    d = q.check("unit-a", "gpt-4o", images=2)
    assert (d.allowed, d.limit, d.by_budget) == (False, "images_per_minute", False)
    q.close()


def test_every_unit_is_its_measures_combined() -> None:
    m = (1, 900, 50, 800, 2, 1234)
    assert MEASURES[-1] == "cost_micros"
    values = {name: unit_value(i, m) for i, name in enumerate(UNITS)}
    assert values == {
        "requests": 1, "prompt_tokens": 900, "completion_tokens": 50, "tokens": 950,
        "uncached_prompt_tokens": 100, "images": 2, "cost": 1234,
    }  # fmt: skip


ALL_UNITS = parse_policies(
    {
        "policies": [
            {
                "name": "all",
                "keys": ["*"],
                "max_staleness": 600,
                "budget_shares": False,
                "limits": {f"{unit}_per_{w}": 10**12 for unit in UNITS for w in ("minute", "hour")},
            }
        ]
    }
)


calls = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=3000),  # seconds before the last record
        st.integers(0, 5000),  # prompt
        st.integers(0, 500),  # completion
        st.integers(0, 100),  # images
        st.integers(0, 10**7),  # cost
        st.integers(0, 100),  # cached, as a percentage of the prompt
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(calls=calls, later=st.floats(min_value=0, max_value=200))
def test_worker_and_sdk_count_every_unit_of_every_record_alike(
    calls: list[tuple[float, int, int, int, int, int]], later: float
) -> None:
    """Records folded by the worker, published as a state and applied by an SDK: for every
    unit and window, the worker's limit status and the SDK's remaining equal a recount."""
    last = T0 + 3000
    records = [
        WireRecord(
            id=f"r{i}",
            ts=last - back,
            key="k",
            model="m",
            source="elsewhere",
            prompt_tokens=pt,
            completion_tokens=ct,
            cached_prompt_tokens=pt * pc // 100,
            images=img,
            cost_micros=cost,
        )
        for i, (back, pt, ct, img, cost, pc) in enumerate(calls)
    ]
    records.sort(key=lambda r: r.ts)
    entries: dict = {}
    fold_records(entries, records, scopes_for(ALL_UNITS), 10_000.0, now=last)
    now = last + later
    state = evaluate("k", entries["k"], ALL_UNITS, now)
    cache = QuotaCache(ALL_UNITS, "me", clock=lambda: now)
    cache.mark_heard()
    cache.apply_state(QuotaState.from_json(state.to_json()))
    remaining = cache.check("k", "m", requests=0).remaining
    for status in state.limits:
        spec = ALL_UNITS.policies[0].spec_named(status.name)
        assert spec is not None
        floor = sliding_floor(now, spec.window)
        unit = list(UNITS).index(spec.unit)
        expected = sum(
            unit_value(unit, (r.requests, r.prompt_tokens, r.completion_tokens,
                              r.cached_prompt_tokens, r.images, r.cost_micros or 0))
            for r in records
            if bucket_start(r.ts, spec.window) >= floor
        )  # fmt: skip
        assert status.used == expected, status.name
        assert remaining[status.name] == spec.limit - expected, status.name


def test_entries_and_states_of_earlier_versions_are_widened_on_load() -> None:
    """An entry saved with three measures per bucket, and a version 2 state, still read."""
    old = {"wm": T0, "s": {"": {"60": [T0, 2, 30, 4, T0 + 0.5, 1, 10, 1]}}, "src": {},
           "t": [3, 3, 40, 5], "late": 0, "dup": 0, "ids": {}, "m": {}}  # fmt: skip
    entry = upgraded(json.loads(json.dumps(old)))
    flat = entry["s"][""]["60"]
    assert len(flat) == 2 * STRIDE and flat[:STRIDE] == [T0, 2, 30, 4, 0, 0, 0]
    assert sliding_counts(entry, "", 60, T0 + 1, 0)[:STRIDE] == (T0 + 1, 3, 40, 5, 0, 0, 0)
    assert widen([1.0, 2, 3, 4], 4) == [1.0, 2, 3, 4, 0, 0, 0]
    v2 = {"v": 2, "key": "k", "published_at": T0, "scopes": {"": {"policy": "p", "windows": {
        "60": [T0, 5, 50, 7, [[T0 + 60.5, 5, 50, 7]]]}}}}  # fmt: skip
    state = QuotaState.from_json(json.dumps(v2))
    assert state.scopes[""][60] == (T0, 5, 50, 7, 0, 0, 0, ((T0 + 60.5, 5, 50, 7, 0, 0, 0),))
