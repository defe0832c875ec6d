from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.policies import parse_policies
from quotaflow.record import UsageRecord
from quotaflow.state import EXPIRIES, STATE_EXPIRIES
from quotaflow.windows import bucket_size
from quotaflow_stream.aggregate import add_records
from quotaflow_stream.entry import STRIDE
from quotaflow_stream.evaluate import (
    budget_shares,
    evaluate,
    minute_sums,
    scopes_for,
    sliding_counts,
)

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


def counted(entry, scope: str, size: int, now: float) -> tuple[int, int, int]:
    """(requests, prompt, completion) counted in the sliding window at ``now``."""
    return sliding_counts(entry, scope, size, now, 0)[1:4]


def starts_and_requests(entry, field: str) -> list[list[float]]:
    """(start, requests) of each of a window's buckets (they lie flat, four numbers each)."""
    flat = entry["s"][""][field]
    return [[flat[i], flat[i + 1]] for i in range(0, len(flat), STRIDE)]


def rec(i: int, ts: float, model: str = "small", pt: int = 10, ct: int = 5, source: str = "a"):
    return UsageRecord(
        id=str(i), ts=ts, key="k1", model=model, prompt_tokens=pt, completion_tokens=ct,
        source=source,
    )  # fmt: skip


def test_records_fold_into_windows_and_totals() -> None:
    entry, late = add_records(None, [rec(1, M0 + 1), rec(2, M0 + 2, source="b")], SCOPES, 10)
    assert late == 0
    assert counted(entry, "", 60, M0 + 30) == (2, 20, 10)
    # records, requests, prompt, completion, cost, cached, cache-write, reasoning, images
    assert entry["t"] == [2, 2, 20, 10, 0, 0, 0, 0, 0]
    assert {s: seen[0] for s, seen in entry["src"].items()} == {"a": M0 + 1, "b": M0 + 2}
    assert "small" not in entry["s"], "no model policy binds 'small'"


def test_lifetime_totals_sum_each_records_cost_and_price_those_without() -> None:
    """A v2 record's cost as given; a v1 record priced by the table at its own time; one
    nobody can price adds nothing. Integers throughout."""
    from quotaflow.prices import PriceTable
    from quotaflow.state import QuotaState
    from quotaflow_stream.aggregate import fold_records
    from quotaflow_stream.entry import upgraded

    table = PriceTable()
    priced = UsageRecord(id="1", ts=M0, key="k1", model="gpt-4o", prompt_tokens=10,
                         cost_micros=7, source="a")  # fmt: skip
    v1 = UsageRecord(id="2", ts=M0, key="k1", model="gpt-4o", prompt_tokens=1_000_000, source="a")
    unknown = UsageRecord(id="3", ts=M0, key="k1", model="house-x", prompt_tokens=5, source="a")
    entries: dict = {}
    fold_records(entries, [priced, v1, unknown], SCOPES, 10, now=M0, price=table.record_cost)
    assert entries["k1"]["t"][4] == 7 + 2_500_000
    assert entries["k1"]["m"]["gpt-4o"][4] == 2_500_007 and entries["k1"]["m"]["house-x"][4] == 0
    state = evaluate("k1", entries["k1"], POLICIES, M0 + 1)
    assert state.totals.cost_micros == 2_500_007
    assert QuotaState.from_json(state.to_json()).models["gpt-4o"].cost_micros == 2_500_007
    # an entry saved before cost was counted loads with cost 0 and goes on counting
    old = {"wm": M0, "s": {}, "src": {}, "t": [3, 3, 30, 0], "m": {"gpt-4o": [3, 3, 30, 0]},
           "late": 0, "dup": 0, "ids": {}}  # fmt: skip
    entries = {"k1": upgraded(old)}  # type: ignore[arg-type]
    billed = UsageRecord(id="4", ts=M0, key="k1", model="gpt-4o", prompt_tokens=10,
                         cached_prompt_tokens=4, cache_write_tokens=2, completion_tokens=9,
                         reasoning_tokens=3, images=1, cost_micros=5, source="a")  # fmt: skip
    fold_records(entries, [priced, billed], SCOPES, 10, now=M0, price=table.record_cost)
    assert entries["k1"]["t"] == [5, 5, 50, 9, 12, 4, 2, 3, 1]
    assert entries["k1"]["m"]["gpt-4o"] == [5, 5, 50, 9, 12, 4, 2, 3, 1]
    totals = evaluate("k1", entries["k1"], POLICIES, M0 + 1).totals
    assert (totals.cached_prompt_tokens, totals.reasoning_tokens, totals.images) == (4, 3, 1)


def test_model_scope_is_kept_where_a_model_policy_binds() -> None:
    entry, _ = add_records(None, [rec(1, M0 + 1, model="big", pt=60, ct=0)], SCOPES, 10)
    assert counted(entry, "big", 60, M0 + 1) == (1, 60, 0)
    assert counted(entry, "", 60, M0 + 1) == (1, 60, 0)


def test_entry_is_folded_in_place_across_messages() -> None:
    entry, _ = add_records(None, [rec(1, M0 + 1)], SCOPES, 10)
    again, _ = add_records(entry, [rec(2, M0 + 1.1), rec(3, M0 + 2)], SCOPES, 10)
    assert again is entry
    assert starts_and_requests(entry, "60") == [[M0 + 1, 2], [M0 + 2, 1]]


def test_windows_slide_bucket_by_bucket() -> None:
    entry, _ = add_records(None, [rec(1, M0 + 10.7), rec(2, M0 + 40.2)], SCOPES, 10)
    assert counted(entry, "", 60, M0 + 70.7)[0] == 2, "bucket [10.625, 10.75) still counts"
    assert counted(entry, "", 60, M0 + 70.75)[0] == 1, "it expires 60.125 s after it began"
    assert counted(entry, "", 60, M0 + 100.25)[0] == 0
    window = sliding_counts(entry, "", 60, M0 + 50, 16)
    req, expiries = window[1], window[EXPIRIES]
    # (expires_at, requests, prompt, completion, cached, images, cost)
    first, second = (M0 + 70.75, 1, 10, 5, 0, 0, 0), (M0 + 100.25, 1, 10, 5, 0, 0, 0)
    assert req == 2 and expiries == (first, second)
    assert sliding_counts(entry, "", 60, M0 + 50, 1)[EXPIRIES] == (first,)


def test_late_within_grace_counts_in_its_window_beyond_grace_does_not() -> None:
    entry, _ = add_records(None, [rec(1, M0 + 65)], SCOPES, grace=10)
    entry, late = add_records(entry, [rec(2, M0 + 20)], SCOPES, grace=10)  # its bucket counts
    assert late == 0 and counted(entry, "", 60, M0 + 65)[0] == 2
    entry, _ = add_records(entry, [rec(3, M0 + 95)], SCOPES, grace=10)  # watermark M0+95
    entry, late = add_records(entry, [rec(4, M0 + 20)], SCOPES, grace=10)  # expired + grace
    assert late == 1 and entry["late"] == 1
    assert counted(entry, "", 60, M0 + 95)[0] == 2, "expired buckets are pruned"
    assert counted(entry, "", 3600, M0 + 95)[0] == 4, "the hour window still counts all"
    assert entry["t"][0] == 4, "totals keep every record"


def test_out_of_order_records_land_in_their_own_buckets() -> None:
    entry, _ = add_records(None, [rec(1, M0 + 30), rec(2, M0 + 10), rec(3, M0 + 20)], SCOPES, 10)
    entry, _ = add_records(entry, [rec(4, M0 + 10.1)], SCOPES, 10)
    assert starts_and_requests(entry, "60") == [[M0 + 10, 2], [M0 + 20, 1], [M0 + 30, 1]]


def test_evaluate_throttles_until_enough_usage_frees() -> None:
    entry, _ = add_records(None, [rec(i, M0 + i) for i in range(3)], SCOPES, 10)
    state = evaluate("k1", entry, POLICIES, now=M0 + 20)
    assert state.throttled and state.denied_by == "requests_per_minute"
    # the first bucket [M0, M0+0.125) frees at M0+60.125: one request below the limit again
    assert state.retry_after == pytest.approx(40.125)
    assert state.instances == 1 and state.totals.records == 3
    (lim,) = state.limits
    assert (lim.used, lim.remaining, lim.reset_at) == (3, 0, M0 + 60.125)


TOKENS = parse_policies(
    {"policies": [{"name": "t", "keys": ["k*"], "limits": {"tokens_per_minute": 100,
                                                          "tokens_per_hour": 10_000}}]}
)  # fmt: skip


def test_a_throttled_limit_frees_when_its_usage_does_however_many_buckets_that_takes() -> None:
    """More small buckets than a state lists, then a large one: the limit admits again only
    when the large one frees, beyond the listed expiries (the reset is drawn from every
    bucket)."""
    n = STATE_EXPIRIES[60] + 6
    small = [rec(i, M0 + i / 2, pt=1, ct=0) for i in range(n)]
    entry, _ = add_records(None, [*small, rec(n, M0 + n / 2, pt=100, ct=0)], SCOPES, 10)
    state = evaluate("k1", entry, TOKENS, now=M0 + n / 2 + 5)
    minute = next(lim for lim in state.limits if lim.name == "tokens_per_minute")
    assert (minute.used, minute.remaining) == (n + 100, 0) and state.throttled
    assert minute.reset_at == M0 + n / 2 + 60.125, "when the last bucket frees"
    assert state.retry_after == pytest.approx(60.125 - 5)


@pytest.mark.parametrize("spread", [4, 80], ids=["few-buckets", "more-than-a-state-lists"])
def test_a_limit_with_room_resets_when_its_newest_usage_frees(spread: int) -> None:
    """Not throttled, a limit's reset is when everything in its window has freed: its newest
    bucket's expiry, the minute buckets not rolled up yet counting in the hour window (also
    past the expiries a state lists)."""
    times = [i * 600 / spread for i in range(spread)] + [600 + i * 0.5 for i in range(spread)]
    entry, _ = add_records(None, [rec(i, M0 + t, pt=1, ct=0) for i, t in enumerate(times)],
                           SCOPES, 10)  # fmt: skip
    newest = M0 + times[-1]
    state = evaluate("k1", entry, TOKENS, now=newest + 1)
    resets = {lim.name: lim.reset_at for lim in state.limits}
    assert resets["tokens_per_minute"] == (newest // 0.125) * 0.125 + 60.125
    assert resets["tokens_per_hour"] == (newest // 30) * 30 + 3600 + 30
    # once nothing counts, the reset is now
    later = evaluate("k1", entry, TOKENS, now=newest + 3700)
    assert {lim.name: lim.reset_at for lim in later.limits} == dict.fromkeys(resets, newest + 3700)


def test_no_burst_at_the_minute_edge() -> None:
    """Spending the limit at 0:59 leaves nothing at 1:00 (a fixed window would allow 2x)."""
    entry, _ = add_records(None, [rec(i, M0 + 59.5) for i in range(3)], SCOPES, 10)
    assert evaluate("k1", entry, POLICIES, now=M0 + 60.5).throttled
    assert evaluate("k1", entry, POLICIES, now=M0 + 119.5).throttled
    assert not evaluate("k1", entry, POLICIES, now=M0 + 120.0).throttled


def test_evaluate_once_usage_has_expired_is_open() -> None:
    entry, _ = add_records(None, [rec(i, M0 + i) for i in range(3)], SCOPES, 10)
    state = evaluate("k1", entry, POLICIES, now=M0 + 63)
    assert not state.throttled and state.limits[0].used == 0


def test_budget_shares_sum_to_at_most_one_and_follow_recent_rates() -> None:
    busy = [rec(i, M0 + i / 10, source="busy") for i in range(30)]
    idle = [rec(100, M0 + 1, source="idle")]
    entry, _ = add_records(None, busy + idle, SCOPES, 10)
    shares = budget_shares(entry)
    assert set(shares) == {"busy", "idle"}
    assert sum(shares.values()) <= 1.0
    # half split evenly (0.25 each), half by recent requests (~29:1)
    assert shares["busy"] > 0.72 and 0.25 <= shares["idle"] < 0.28, shares
    # a source silent for over a minute no longer takes a share
    entry, _ = add_records(entry, [rec(200, M0 + 70, source="busy")], SCOPES, 10)
    assert budget_shares(entry) == {"busy": 1.0}


def test_state_json_round_trip() -> None:
    from quotaflow.state import QuotaState

    entry, _ = add_records(None, [rec(1, M0 + 1, model="big", pt=200)], SCOPES, 10)
    state = evaluate("k1", entry, POLICIES, now=M0 + 2)
    again = QuotaState.from_json(state.to_json())
    assert again == state
    assert again.denied_by == "big/tokens_per_minute"
    assert again.shares == {"a": 1.0}


def sdk_rec(counter: int, ts: float, prefix: str = "0123456789abcdef") -> UsageRecord:
    return UsageRecord(
        id=f"{prefix}-{counter:x}", ts=ts, key="k1", model="small", prompt_tokens=10, source="a"
    )


def test_a_record_id_counts_once() -> None:
    recs = [sdk_rec(i, M0 + i / 10) for i in range(5)]
    entry, _ = add_records(None, recs, SCOPES, 10)
    entry, _ = add_records(entry, [*recs[1:3], sdk_rec(5, M0 + 1)], SCOPES, 10)  # redelivery
    assert entry["t"][0] == 6 and entry["dup"] == 2
    entry, _ = add_records(entry, [rec(1, M0 + 1), rec(1, M0 + 1)], SCOPES, 10)  # other ids
    assert entry["t"][0] == 7 and entry["dup"] == 3


def test_sdk_ids_may_arrive_out_of_order_within_the_window() -> None:
    entry, _ = add_records(None, [sdk_rec(100, M0)], SCOPES, 10)
    late_ones = [sdk_rec(100 - k, M0) for k in (1, 5, 63)]
    entry, _ = add_records(entry, late_ones, SCOPES, 10)
    assert entry["t"][0] == 4 and entry["dup"] == 0
    entry, _ = add_records(entry, [*late_ones, sdk_rec(100 - 64, M0)], SCOPES, 10)
    assert entry["t"][0] == 4 and entry["dup"] == 4, "64 behind is taken as counted"
    # another instance's counters are its own
    entry, _ = add_records(entry, [sdk_rec(1, M0, prefix="fedcba9876543210")], SCOPES, 10)
    assert entry["t"][0] == 5


def test_ids_are_forgotten_after_the_horizon() -> None:
    entry, _ = add_records(None, [rec(1, M0), sdk_rec(7, M0)], SCOPES, 10, horizon=100)
    entry, _ = add_records(entry, [rec(2, M0 + 50)], SCOPES, 10, horizon=100)
    assert "1" in entry["xid"] and entry["ids"]
    entry, _ = add_records(entry, [rec(3, M0 + 101)], SCOPES, 10, horizon=100)
    assert "1" not in entry["xid"] and "2" in entry["xid"] and not entry["ids"]


def test_an_old_record_replayed_twice_counts_once() -> None:
    """The horizon runs on arrival (worker clock), not event time: a two-day-old log line
    replayed twice within a day counts once, in the totals only (it is late for every window)."""
    old = rec(1, M0 - 2 * 86400)
    entry, late = add_records(None, [rec(0, M0)], SCOPES, 10, now=M0)
    entry, late = add_records(entry, [old], SCOPES, 10, now=M0 + 5)
    assert late == 1
    entry, _ = add_records(entry, [old], SCOPES, 10, now=M0 + 3600)
    assert entry["t"][0] == 2 and entry["dup"] == 1


#: A record's billed units beyond requests and prompt tokens, mostly none (as most calls bill):
#: (completion, cached prompt, images, cost).
_EXTRA = st.one_of(
    st.just((0, 0, 0, 0)),
    st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 2), st.integers(0, 9)),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 7300), st.integers(1, 3), _EXTRA), min_size=1, max_size=60),
    st.floats(0, 4000),
    st.integers(1, 4),
)
def test_sliding_counts_equal_a_recount_of_the_records_each_window_took(
    arrivals: list[tuple[float, int, tuple[int, int, int, int]]], after: float, per_message: int
) -> None:
    """However records arrive (out of order, late, in messages of any size, billing some units
    or none), each window's sliding count of every measure is the sum of the records its bucket
    admitted, as a brute-force recount."""
    records = [
        UsageRecord(
            id=str(i),
            ts=M0 + t,
            key="k1",
            model="small",
            prompt_tokens=n,
            completion_tokens=ct,
            cached_prompt_tokens=cached,
            images=images,
            cost_micros=cost,
            source="a",
        )
        for i, (t, n, (ct, cached, images, cost)) in enumerate(arrivals)
    ]
    entry = None
    for i in range(0, len(records), per_message):
        entry, _ = add_records(entry, records[i : i + per_message], SCOPES, 10)
    assert entry is not None
    # the reference: a record counts in a window if its bucket was not yet past the window
    # (plus grace) at the watermark when it arrived
    wm = 0.0
    taken: dict[int, list[tuple[float, tuple[int, ...]]]] = {60: [], 3600: [], 86400: []}
    for r in records:
        wm = max(wm, r.ts)
        for size in taken:
            b = bucket_size(size)
            start = (r.ts // b) * b
            if start + size + b + 10 > wm:
                measures = (r.requests, r.prompt_tokens, r.completion_tokens,
                            r.cached_prompt_tokens, r.images, r.cost_micros)  # fmt: skip
                taken[size].append((start, measures))
    now = wm + after
    for size, kept in taken.items():
        floor = (now // bucket_size(size)) * bucket_size(size) - size
        expected = tuple(map(sum, zip(*(m for start, m in kept if start >= floor), strict=True)))
        got = sliding_counts(entry, "", size, now, 1 << 30)
        assert got[1:EXPIRIES] == (expected or (0,) * 6), (size, now)
        # the minute buckets summed once for every window, as a publication does: the same
        for expiring in (0, 1 << 30):
            with_pending = sliding_counts(entry, "", size, now, expiring, minute_sums(entry, ""))
            assert with_pending == sliding_counts(entry, "", size, now, expiring), (size, now)
        freeing = tuple(map(sum, zip(*(x[1:] for x in got[EXPIRIES]), strict=True)))
        assert freeing == (got[1:EXPIRIES] if got[EXPIRIES] else ()), "expiries add up"
        assert got[EXPIRIES] or not any(got[1:EXPIRIES]), "a count with nothing to free"
        assert sliding_counts(entry, "", size, now, 0) == (*got[:EXPIRIES], ())


def test_minute_buckets_not_rolled_up_yet_leave_every_window_in_time() -> None:
    """A key quiet since its last record keeps that record's minute bucket until it is pruned:
    read an hour and a day later, neither window counts it any more, summed once or not."""
    entry, _ = add_records(None, [rec(1, M0 + 1)], SCOPES, 10)
    for size, later in ((60, 65), (3600, 3700), (86400, 86400 + 1000)):
        for pending in (None, minute_sums(entry, "")):
            assert sliding_counts(entry, "", size, M0 + later, 0, pending)[1:4] == (0, 0, 0)
            assert sliding_counts(entry, "", size, M0 + 30, 0, pending)[1:4] == (1, 10, 5)


def test_a_shadow_mode_policy_at_its_ceiling_does_not_throttle_the_state() -> None:
    shadow = parse_policies({"policies": [{"name": "s", "keys": ["k*"], "enforce": False,
                                           "limits": {"requests_per_minute": 2}}]})  # fmt: skip
    entry, _ = add_records(None, [rec(i, M0 + i) for i in range(3)], SCOPES, 10)
    state = evaluate("k1", entry, shadow, now=M0 + 5)
    assert not state.throttled and state.denied_by is None
    assert state.shadow == ("requests_per_minute",)
    assert state.limits[0].remaining == 0, "its figures are computed as ever"
    from quotaflow.state import QuotaState

    assert QuotaState.from_json(state.to_json()).shadow == ("requests_per_minute",)
    enforced = evaluate("k1", entry, POLICIES, now=M0 + 5)
    assert enforced.throttled and enforced.shadow == ()
