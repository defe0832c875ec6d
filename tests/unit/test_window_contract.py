"""One window contract: the hot paths inline :mod:`quotaflow.windows`; each inlined copy is held
here to the reference functions, over generated times (hypothesis)."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from quotaflow.cache import QuotaCache
from quotaflow.counting import denied_until
from quotaflow.policies import parse_policies
from quotaflow.record import WireRecord
from quotaflow.units import UNIT_NAMES, unit_value
from quotaflow.windows import (
    DAY,
    HOUR,
    MINUTE,
    bucket_expires_at,
    bucket_start,
    frees_at,
    is_expired,
    sliding_floor,
    window_end,
    window_start,
)
from quotaflow_stream.aggregate import fold_records, prune
from quotaflow_stream.entry import STRIDE
from quotaflow_stream.evaluate import scopes_for

T0 = 1_700_000_000.0
POLICIES = parse_policies(
    {
        "version": 1,
        "policies": [
            {
                "name": "p",
                "keys": ["*"],
                "fail_mode": "local",
                "expected_instances": 1,
                "limits": {
                    "requests_per_minute": 10**6,
                    "requests_per_hour": 10**6,
                    "requests_per_day": 10**6,
                },
            }
        ],
    }
)
SCOPES = scopes_for(POLICIES)

# event times on (and off) bucket edges: halves and thirds of seconds around T0
offsets = st.one_of(
    st.integers(min_value=-200_000, max_value=200_000).map(lambda n: n / 2),
    st.floats(min_value=-100_000, max_value=100_000, allow_nan=False),
)
graces = st.sampled_from([0.0, 0.5, 10.0, 45.0])


def record(i: int, ts: float) -> WireRecord:
    return WireRecord(id=f"r-{i}", ts=ts, key="k", model="m", source="s")


backs = st.one_of(
    st.integers(min_value=0, max_value=400_000).map(lambda n: n / 2),
    st.floats(min_value=0, max_value=200_000, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(newest=offsets, back=backs, grace=graces)
# the edges themselves: a bucket expires the moment the watermark reaches its end plus grace
@example(newest=0.0, back=60.5, grace=0.0)
@example(newest=0.0, back=60.0, grace=0.0)
@example(newest=0.0, back=70.5, grace=10.0)
# (T0 + 100 starts a day bucket: these records start the hour and day buckets they are in)
@example(newest=100.0 + HOUR + 30.0 + 10.0, back=HOUR + 30.0 + 10.0, grace=10.0)
@example(newest=100.0 + DAY + 900.0, back=DAY + 900.0, grace=0.0)
def test_the_fold_buckets_and_judges_lateness_as_the_windows_module_does(
    newest: float, back: float, grace: float
) -> None:
    """A record after the key's watermark ``wm`` went to ``bucket_start`` of its time, and is
    late exactly when its minute bucket ``is_expired`` at ``wm``; a late record still counts
    in each longer window whose bucket has not expired."""
    wm, ts = T0 + newest, T0 + newest - back
    entries: dict = {}
    late, _ = fold_records(entries, [record(1, wm), record(2, ts)], SCOPES, grace, now=wm)
    windows = entries["k"]["s"][""]
    minute_late = is_expired(bucket_start(ts, MINUTE), MINUTE, wm, grace)
    assert late == int(minute_late)
    minute = windows["60"]
    starts = set(minute[0::STRIDE])
    if not minute_late:
        assert bucket_start(ts, MINUTE) in starts
    else:
        assert bucket_start(ts, MINUTE) not in starts
        for size in (HOUR, DAY):
            counted = bucket_start(ts, size) in set(windows.get(str(size), [])[0::STRIDE])
            assert counted == (not is_expired(bucket_start(ts, size), size, wm, grace))


@settings(max_examples=200, deadline=None)
@given(times=st.lists(offsets, min_size=1, max_size=30), later=offsets, grace=graces)
def test_prune_keeps_exactly_the_buckets_that_have_not_expired(
    times: list[float], later: float, grace: float
) -> None:
    entries: dict = {}
    recs = [record(i, T0 + t) for i, t in enumerate(sorted(times))]
    fold_records(entries, recs, SCOPES, grace, now=T0 + max(times))
    entry = entries["k"]
    entry["wm"] = wm = max(entry["wm"], T0 + later)
    prune(entry, grace, now=wm)
    for field, size in (("60", MINUTE), ("3600", HOUR), ("86400", DAY)):
        for start in entry["s"][""].get(field, [])[0::STRIDE]:
            assert not is_expired(start, size, wm, grace), (field, start, wm)
    # and nothing was lost that still counts: minute buckets rolled into the longer windows
    day = entry["s"][""].get("86400", [])
    kept = sum(entry["s"][""].get("60", [])[1::STRIDE]) + sum(day[1::STRIDE])
    still = sum(1 for r in recs if not is_expired(bucket_start(r.ts, DAY), DAY, wm, grace))
    assert kept >= still


@settings(max_examples=300, deadline=None)
@given(ts=offsets)
def test_the_caches_own_usage_windows_start_where_window_start_says(ts: float) -> None:
    cache = QuotaCache(POLICIES, "me", clock=lambda: T0)
    cache.add_usage("k", (T0 + ts, "m", 1, 0, 0, 0, 0, 0))
    for size in (MINUTE, HOUR, DAY):
        assert cache._own[("k", "", size)][0] == window_start(T0 + ts, size)


@settings(max_examples=300, deadline=None)
@given(ts=offsets, now=offsets)
def test_check_counts_pending_usage_from_the_sliding_floor_on(ts: float, now: float) -> None:
    """Unacknowledged usage at ``ts`` counts in ``check()`` at ``now`` exactly when its bucket
    starts at or after ``sliding_floor(now)``; in the local fail mode its window is the fixed
    one from ``window_start`` to ``window_end``."""
    at = [T0 + now]
    cache = QuotaCache(POLICIES, "me", clock=lambda: at[0])
    cache.mark_heard()
    cache.add_usage("k", (T0 + ts, "m", 5, 0, 0, 0, 0, 0))
    remaining = cache.check("k", "m", requests=0).remaining
    for name, size in (("requests_per_minute", MINUTE), ("requests_per_hour", HOUR),
                       ("requests_per_day", DAY)):  # fmt: skip
        counted = bucket_start(T0 + ts, size) >= sliding_floor(T0 + now, size)
        assert remaining[name] == 10**6 - (5 if counted else 0), (name, ts, now)
    at[0] += 10**6  # silent past max_staleness: the local mode counts own fixed windows
    stale = cache.check("k", "m", requests=0)
    assert stale.reason == "stale_local"
    for name, size in (("requests_per_minute", MINUTE), ("requests_per_day", DAY)):
        same = window_start(T0 + ts, size) == window_start(at[0], size)
        assert stale.remaining[name] == 10**6 - (5 if same else 0)
        assert window_end(at[0], size) > at[0]


@settings(max_examples=300, deadline=None)
@given(ts=offsets, later=backs)
def test_a_windows_count_starts_floors_and_frees_as_the_windows_module_says(
    ts: float, later: float
) -> None:
    """sliding_counts (every publication) inlines bucket_start, sliding_floor and
    bucket_expires_at: its current bucket, which buckets count and when each frees."""
    from quotaflow.windows import bucket_expires_at
    from quotaflow_stream.evaluate import sliding_counts

    entries: dict = {}
    fold_records(entries, [record(0, T0 + ts)], SCOPES, 10.0)
    now = T0 + ts + later
    for size in (MINUTE, HOUR, DAY):
        got = sliding_counts(entries["k"], "", size, now, 1)
        assert got[0] == bucket_start(now, size)
        counts = bucket_start(T0 + ts, size) >= sliding_floor(now, size)
        assert got[1] == int(counts)
        assert got[-1] == (
            ((bucket_expires_at(bucket_start(T0 + ts, size), size), 1, 0, 0, 0, 0, 0),)
            if counts
            else ()
        )


def _reset_reference(
    counted: int, listed: tuple[tuple[float, ...], ...], pending: list[tuple[Any, ...]],
    unit: int, size: int, allowed: int, now: float,
) -> float:  # fmt: skip
    """denied_until as first written: every free listed and sorted, the windows' functions."""
    frees = [(x[0], unit_value(unit, x, 1)) for x in listed]
    floor = sliding_floor(now, size)
    used = counted
    for p in pending:
        if p[0] >= floor:
            amount = unit_value(unit, p, 2)
            used += amount
            frees.append((bucket_expires_at(bucket_start(p[0], size), size), amount))
    frees.sort()
    return frees_at(used, allowed, frees, now, bucket_expires_at(floor + size, size))


measures = st.tuples(*(st.integers(min_value=0, max_value=50) for _ in range(6)))


@settings(max_examples=300, deadline=None)
@given(
    listed=st.lists(st.tuples(st.floats(min_value=-5, max_value=70), measures), max_size=70),
    pending=st.lists(st.tuples(st.floats(min_value=-70, max_value=0), measures), max_size=20),
    unit=st.sampled_from(["requests", "tokens", "uncached_prompt_tokens", "cost"]),
    allowed=st.integers(min_value=-1, max_value=400),
)
def test_denied_until_reads_the_frees_lazily_yet_as_the_reference(
    listed: list[tuple[float, tuple[int, ...]]],
    pending: list[tuple[float, tuple[int, ...]]],
    unit: str,
    allowed: int,
) -> None:
    """The reset of a denied call merges the state's expiries and the pending calls lazily (the
    pending ones in any order: a clock may step back) and stops once enough has freed; the
    answer is the reference's, which lists and sorts every free."""
    now = T0 + 30.0
    index = UNIT_NAMES.index(unit)
    expiries = tuple(sorted((now + at, *m) for at, m in listed))
    calls = [(now + at, "m", *m) for at, m in pending]
    window = (now, *(sum(x[i] for x in expiries) for i in range(1, 7)), expiries)
    counted = unit_value(index, window, 1)
    want = _reset_reference(counted, expiries, calls, index, MINUTE, allowed, now)
    assert denied_until({MINUTE: window}, calls, "", index, MINUTE, allowed, now) == want
