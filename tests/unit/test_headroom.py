"""The fast path of check() (quotaflow.headroom) answers exactly as the full decision would.

Two caches see the same operations, in any order hypothesis finds: states arriving, this
process's calls recorded, holds taken and released, the clock moving (buckets expiring, the
stream going silent, a month ending), the fleet growing, policies changing. One answers with
headrooms, the other decides every check in full; every answer, every field of it, must match.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotaflow.cache import QuotaCache
from quotaflow.decision import Decision
from quotaflow.headroom import check_rates, token_price, tokens_within
from quotaflow.policies import PolicySet, parse_policies
from quotaflow.prices import RATE_SCALE, ModelPrices
from quotaflow.state import QuotaState
from quotaflow.windows import month_period

T0 = 1_700_000_040.0 + 40  # 40 s into a minute
MONTH_END = month_period(T0)[1]
KEYS = ("k1", "k2")
MODELS = (None, "big", "small", "pics")

# $2 and $8 per million prompt and completion tokens, cached prompt tokens at a quarter
PRICES = ModelPrices(
    "big", None, "test",
    (2 * RATE_SCALE, 8 * RATE_SCALE, 0, -3 * RATE_SCALE // 2, 0, 0, 0),
)  # fmt: skip


# above 1000 prompt tokens, twice the price (a long-context tier)
TIERED = ModelPrices(
    "small", None, "test", (RATE_SCALE // 3, RATE_SCALE, 0, 0, 0, 0, 7 * RATE_SCALE),
    ((1000, (2 * RATE_SCALE // 3, 2 * RATE_SCALE, 0, 0, 0, 0, 7 * RATE_SCALE)),),
)  # fmt: skip


# flat, with a price per image: a call without its cost is priced on the fast path
PICS = ModelPrices("pics", None, "test", (RATE_SCALE, RATE_SCALE, 0, 0, 0, 0, 40 * RATE_SCALE))


PRICED = {"big": PRICES, "small": TIERED, "pics": PICS}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FixedRandom(random.Random):
    """The budget share's chance admissions, the same for both caches however often drawn."""

    def random(self) -> float:
        return 0.5


def make_policies(shares: bool, enforce_model: bool, fail_mode: str) -> PolicySet:
    return parse_policies({"policies": [
        {"name": "p", "keys": ["k*"], "fail_mode": fail_mode, "max_staleness": 30,
         "expected_instances": 2, "budget_shares": shares,
         "limits": {"requests_per_minute": 12, "tokens_per_minute": 4000,
                    "cost_per_hour": 0.05, "tokens_per_month": 60_000}},
        {"name": "m", "keys": ["k*"], "models": ["big"], "enforce": enforce_model,
         "limits": {"uncached_prompt_tokens_per_minute": 2500, "images_per_minute": 3}},
    ]})  # fmt: skip


def caches(policies: PolicySet) -> tuple[QuotaCache, QuotaCache, Clock]:
    clock = Clock()
    made = []
    for headroom in (True, False):
        cache = QuotaCache(
            policies, "me", clock=clock, rng=FixedRandom(), headroom=headroom,
            prices=lambda key, model, now: PRICED.get(model),
        )  # fmt: skip
        cache.mark_heard()
        made.append(cache)
    return made[0], made[1], clock


measures = st.tuples(
    st.integers(0, 2),  # requests
    st.integers(0, 1500),  # prompt
    st.integers(0, 800),  # completion
    st.integers(0, 400),  # cached (of prompt: clipped below)
    st.integers(0, 2),  # images
)


@st.composite
def a_state(draw: Any, now: float) -> tuple[str, QuotaState]:
    key = draw(st.sampled_from(KEYS))
    published = now - draw(st.floats(0, 5))

    def window(size: int) -> tuple[Any, ...]:
        req, pt, ct = (
            draw(st.integers(0, 14)),
            draw(st.integers(0, 5000)),
            draw(st.integers(0, 2000)),
        )
        cost = draw(st.integers(0, 60_000))
        expiries = tuple(
            (published + draw(st.floats(0.1, 70)), 1, pt // 4, ct // 4, 0, 0, cost // 4)
            for _ in range(draw(st.integers(0, 3)))
        )
        return (int(published), req, pt, ct, 0, 0, cost, tuple(sorted(expiries)))

    month = (int(month_period(published)[0]), 0, draw(st.integers(0, 60_000)), 0, 0, 0, 0, ())
    scopes = {"": {60: window(60), 3600: window(3600), 31 * 86400: month}}
    if draw(st.booleans()):
        scopes["big"] = {60: window(60)}
    shares = draw(st.sampled_from([{}, {"me": 0.5, "other": 0.5}, {"other": 1.0}]))
    return key, QuotaState(
        key=key, published_at=published, watermark=published, scopes=scopes,
        scope_policies={"": "p"}, sources={"me": published - draw(st.floats(0, 2))},
        shares=shares,
    )  # fmt: skip


def op() -> Any:
    check = st.tuples(st.just("check"), st.sampled_from(KEYS), st.sampled_from(MODELS),
                      measures, st.booleans())  # fmt: skip
    record = st.tuples(st.just("record"), st.sampled_from(KEYS), st.sampled_from(MODELS[1:]),
                       measures)  # fmt: skip
    return st.one_of(
        check, check, check, check, record, record,
        # the last check asked again, as a caller retrying a denied call does
        st.tuples(st.just("again")), st.tuples(st.just("again")),
        st.tuples(st.just("hold"), st.sampled_from(KEYS), st.sampled_from(MODELS[1:]), measures),
        st.tuples(st.just("release"), st.sampled_from(KEYS)),
        st.tuples(st.just("state"), st.integers(0, 2**32)),
        st.tuples(st.just("tick"), st.sampled_from([0.01, 0.3, 2.0, 17.0, 45.0, -1.0])),
        st.tuples(st.just("heard")),
        st.tuples(st.just("fleet"), st.integers(1, 4)),
        st.tuples(st.just("expire")),
    )  # fmt: skip


def fields(d: Decision) -> tuple[Any, ...]:
    return (*d[:6], dict(d.remaining), *d[7:])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op(), min_size=20, max_size=80),
    shares=st.booleans(),
    enforce_model=st.booleans(),
    fail_mode=st.sampled_from(["open", "closed", "local"]),
    month_edge=st.booleans(),
    data=st.data(),
)
def test_fast_and_full_decisions_are_the_same(
    ops: list[Any], shares: bool, enforce_model: bool, fail_mode: str, month_edge: bool,
    data: Any,
) -> None:  # fmt: skip
    fast, full, clock = caches(make_policies(shares, enforce_model, fail_mode))
    if month_edge:  # a minute before the month ends: headrooms must end with it
        clock.now = MONTH_END - 60
    holds: dict[str, list[str]] = {k: [] for k in KEYS}
    last_check: list[Any] | None = None
    for n, (kind, *args) in enumerate(ops):
        if kind == "again":
            if last_check is None:
                continue
            kind, args = "check", last_check
        if kind == "check":
            last_check = args
            key, model, (req, pt, ct, cached, img), priced = args
            cost = None if priced else (pt + ct) // 10
            call = {
                "requests": req,
                "prompt_tokens": pt,
                "completion_tokens": ct,
                "cached_prompt_tokens": min(cached, pt),
                "images": img,
                "cost_micros": cost,
            }
            got, want = fast.check(key, model, **call), full.check(key, model, **call)
            assert fields(got) == fields(want), (n, call)
            # what the gateway's headers say: read off the headroom, or in full
            assert fast.usage(key, model) == full.usage(key, model), (n, call)
        elif kind in ("record", "hold"):
            key, model, (req, pt, ct, cached, img) = args
            pending = (clock.now, model, req, pt, ct, min(cached, pt), img, (pt + ct) // 10)
            for cache in (fast, full):
                if kind == "record":
                    cache.add_usage(key, pending)
                else:
                    cache.hold(key, f"h{n}", pending)
            if kind == "hold":
                holds[key].append(f"h{n}")
        elif kind == "release" and holds[args[0]]:
            hold_id = holds[args[0]].pop(0)
            assert fast.release(args[0], hold_id) and full.release(args[0], hold_id)
        elif kind == "state":
            key, state = data.draw(a_state(clock.now))
            assert fast.apply_state(state) == full.apply_state(state)
        elif kind == "tick":
            clock.now += args[0]
        elif kind == "heard":
            fast.mark_heard()
            full.mark_heard()
        elif kind == "fleet":
            fast.note_fleet("w", args[0])
            full.note_fleet("w", args[0])
        elif kind == "expire":
            fast.expire()
            full.expire()
    assert fast.shadow_denials == full.shadow_denials


def test_most_checks_of_a_key_far_from_its_limits_take_the_fast_path() -> None:
    """The point of it: after a key's first check, checks and records of it stay fast."""
    fast, _, clock = caches(make_policies(True, True, "open"))
    decided = []
    fast._decide = lambda *a: decided.append(a) or QuotaCache._decide(fast, *a)  # type: ignore[method-assign]
    for _ in range(10):  # of 12 a minute
        clock.now += 0.01
        assert fast.check("k1", "big", requests=1, prompt_tokens=20, completion_tokens=10).allowed
        fast.add_usage("k1", (clock.now, "big", 1, 20, 10, 0, 0, 1))
    assert len(decided) == 1, "only the first check is decided in full"


def test_a_reserved_then_settled_call_keeps_the_fast_path() -> None:
    """The gateway's every call: reserve (check, hold), then settle (release, record). The
    released hold goes back to the headroom of its model, which stays exact."""
    fast, full, clock = caches(make_policies(True, True, "open"))
    decided = []
    fast._decide = lambda *a: decided.append(a) or QuotaCache._decide(fast, *a)  # type: ignore[method-assign]
    for n in range(10):
        clock.now += 0.01
        call = {"requests": 1, "prompt_tokens": 20, "completion_tokens": 300}
        assert fields(fast.check("k1", "big", **call)) == fields(full.check("k1", "big", **call))
        worst = (clock.now, "big", 1, 20, 300, 0, 0, 3)
        for cache in (fast, full):
            cache.hold("k1", f"h{n}", worst)
            assert cache.release("k1", f"h{n}")
            cache.add_usage("k1", (clock.now, "big", 1, 20, 12, 0, 0, 1))
    assert len(decided) == 1, "only the first check is decided in full"


def test_a_released_hold_of_another_model_does_not_open_a_model_limit() -> None:
    """A hold of one model, made before a headroom of another: that model's limit never counted
    it, so giving it back there would admit what the full decision denies."""
    fast, full, clock = caches(make_policies(False, True, "open"))
    for cache in (fast, full):  # 1000 tokens of "small": key-wide only
        cache.hold("k1", "h", (clock.now, "small", 1, 1000, 0, 0, 0, 1))
    small = {"requests": 1, "prompt_tokens": 100, "completion_tokens": 0, "cost_micros": 1}
    assert fast.check("k1", "big", **small).allowed  # a headroom of "big": 2500 uncached
    for cache in (fast, full):
        assert cache.release("k1", "h")
    big = {"requests": 1, "prompt_tokens": 3000, "completion_tokens": 0, "cost_micros": 1}
    got, want = fast.check("k1", "big", **big), full.check("k1", "big", **big)
    assert not want.allowed and want.limit == "big/uncached_prompt_tokens_per_minute"
    assert fields(got) == fields(want)


def full_minute(clock: Clock, key: str = "k1") -> QuotaState:
    """A state of ``key``: its 12 requests a minute used, nothing listed to expire."""
    return QuotaState(
        key=key, published_at=clock.now, watermark=clock.now,
        scopes={"": {60: (int(clock.now), 12, 0, 0, 0, 0, 0, ())}},
        scope_policies={"": "p"}, sources={},
    )  # fmt: skip


def test_the_same_call_denied_again_is_answered_without_deciding() -> None:
    """A caller retrying a denied call: the denial is kept, timed anew, until something that
    could change it happens (here this process's own usage of the key)."""
    fast, full, clock = caches(make_policies(False, True, "open"))
    for cache in (fast, full):
        cache.apply_state(full_minute(clock))
    decided = []
    fast._decide = lambda *a: decided.append(a) or QuotaCache._decide(fast, *a)  # type: ignore[method-assign]
    call = {"requests": 1, "prompt_tokens": 10, "completion_tokens": 0}
    for _ in range(5):
        clock.now += 0.01
        got, want = fast.check("k1", None, **call), full.check("k1", None, **call)
        assert not got.allowed and fields(got) == fields(want)
    assert len(decided) == 1
    fast.check("k1", None, requests=1, prompt_tokens=11, completion_tokens=0)  # another call
    for cache in (fast, full):
        cache.add_usage("k1", (clock.now, "small", 0, 5, 0, 0, 0, 0))
    assert fields(fast.check("k1", None, **call)) == fields(full.check("k1", None, **call))
    assert len(decided) == 3


def test_a_kept_denial_ends_with_its_bucket() -> None:
    """Nothing listed frees in time, so the reset is a window after the current bucket: it
    moves when the bucket ends, and the kept denial must not outlive it."""
    fast, full, clock = caches(make_policies(False, True, "open"))
    for cache in (fast, full):
        cache.apply_state(full_minute(clock))
    call = {"requests": 1, "prompt_tokens": 10, "completion_tokens": 0}
    first = fast.check("k1", None, **call)
    assert fields(first) == fields(full.check("k1", None, **call))
    clock.now += 0.3  # two buckets of 0.125 s later
    got, want = fast.check("k1", None, **call), full.check("k1", None, **call)
    assert want.reset_at > first.reset_at
    assert fields(got) == fields(want)


def test_a_kept_denial_whose_reset_is_a_listed_expiry_outlives_its_bucket() -> None:
    """A listed bucket frees the call in 10 s: the answer stands until then, bucket after
    bucket (a caller retrying every few hundred milliseconds asks it again)."""
    fast, full, clock = caches(make_policies(False, True, "open"))
    frees = (clock.now + 10, 1, 0, 0, 0, 0, 0)
    state = QuotaState(
        key="k1", published_at=clock.now, watermark=clock.now,
        scopes={"": {60: (int(clock.now), 12, 0, 0, 0, 0, 0, (frees,))}},
        scope_policies={"": "p"}, sources={},
    )  # fmt: skip
    for cache in (fast, full):
        cache.apply_state(state)
    decided = []
    fast._decide = lambda *a: decided.append(a) or QuotaCache._decide(fast, *a)  # type: ignore[method-assign]
    call = {"requests": 1, "prompt_tokens": 10, "completion_tokens": 0}
    for _ in range(20):
        got, want = fast.check("k1", None, **call), full.check("k1", None, **call)
        assert not want.allowed and want.reset_at == frees[0]
        assert fields(got) == fields(want)
        clock.now += 0.3
    assert len(decided) == 1
    clock.now = frees[0]  # the bucket frees: the call fits
    assert fast.check("k1", None, **call).allowed and len(decided) == 2


def test_a_call_that_does_not_fit_its_headroom_is_decided_in_full() -> None:
    fast, full, clock = caches(make_policies(False, True, "open"))
    assert fast.check("k1", "big", requests=1, prompt_tokens=100, completion_tokens=0).allowed
    for cache in (fast, full):
        cache.add_usage("k1", (clock.now, "big", 11, 100, 0, 0, 0, 1))
    # 12 requests a minute: one more fits exactly (the full path's rule), two do not
    one, two = (
        fast.check("k1", "big", requests=1, prompt_tokens=0, completion_tokens=0),
        fast.check("k1", "big", requests=2, prompt_tokens=0, completion_tokens=0),
    )
    assert one.allowed and one.remaining["requests_per_minute"] == 0
    assert not two.allowed and two.limit == "requests_per_minute"
    assert fields(two) == fields(
        full.check("k1", "big", requests=2, prompt_tokens=0, completion_tokens=0)
    )


def test_a_new_state_of_the_key_replaces_its_headroom() -> None:
    fast, _, clock = caches(make_policies(False, True, "open"))
    assert fast.check("k2", None, requests=1, prompt_tokens=100, completion_tokens=0).allowed
    full_minute = QuotaState(
        key="k2", published_at=clock.now, watermark=clock.now,
        scopes={"": {60: (int(clock.now), 12, 0, 0, 0, 0, 0, ())}},
        scope_policies={"": "p"}, sources={},
    )  # fmt: skip
    fast.apply_state(full_minute)
    d = fast.check("k2", None, requests=1, prompt_tokens=100, completion_tokens=0)
    assert not d.allowed and d.limit == "requests_per_minute"


def test_a_state_arriving_while_a_check_is_decided_in_full_leaves_no_headroom() -> None:
    """The follower thread may install a state while a check is being decided from the one
    before: the headroom that decision would leave misses the new state, so it is not kept."""
    clock = Clock()
    cache: QuotaCache

    def prices_racing_a_state(key: str, model: str, now: float) -> ModelPrices:
        cache.apply_state(QuotaState(
            key=key, published_at=now, watermark=now,
            scopes={"": {60: (int(now), 11, 0, 0, 0, 0, 0, ())}},
            scope_policies={"": "p"}, sources={},
        ))  # fmt: skip
        return PRICES

    cache = QuotaCache(make_policies(False, True, "open"), "me", clock=clock,
                       prices=prices_racing_a_state)  # fmt: skip
    cache.mark_heard()
    assert cache.check(
        "k1", "big", requests=1, prompt_tokens=10, completion_tokens=0
    ).allowed  # decided from no state
    assert "k1" not in cache._headroom
    assert not cache.check(
        "k1", "big", requests=2, prompt_tokens=10, completion_tokens=0
    ).allowed, "the state counts"


def test_a_call_recorded_while_a_check_is_decided_in_full_leaves_no_headroom() -> None:
    """Another thread of this process may record a call of the key while a check is decided
    without it: neither the headroom nor the denial that decision would leave is kept."""
    clock = Clock()
    cache: QuotaCache
    racing = True

    def prices_racing_a_record(key: str, model: str, now: float) -> ModelPrices:
        if racing:  # the key's first headroom, made while this call is recorded
            cache.add_usage(key, (now, "big", 11, 10, 0, 0, 0, 1))
        return PRICES

    cache = QuotaCache(make_policies(False, True, "open"), "me", clock=clock,
                       prices=prices_racing_a_record)  # fmt: skip
    cache.mark_heard()
    call = {"requests": 1, "prompt_tokens": 10, "completion_tokens": 0}
    assert cache.check("k1", "big", **call).allowed  # decided before the 11 requests
    assert "k1" not in cache._headroom
    racing = False
    clock.now += 0.01
    cache.add_usage("k1", (clock.now, "big", 1, 10, 0, 0, 0, 1))  # 12 of 12
    # a denial decided while another call is recorded is not kept either
    racing = True
    clock.now += 0.01
    assert not cache.check("k1", "big", **call).allowed
    assert "k1" not in cache._denied


@given(
    rates=st.tuples(*[st.integers(-(10**19), 10**20)] * 7).map(
        lambda r: tuple(abs(x) if i != 3 else x for i, x in enumerate(r))
    ),
    call=st.tuples(*[st.integers(0, 10**6)] * 5),
)
def test_a_checks_reduced_rates_price_to_the_micro_dollar_as_the_table_does(
    rates: tuple[int, ...], call: tuple[int, ...]
) -> None:
    prompt, completion, requests, cached, images = call
    cached = min(cached, prompt)
    r_in, r_out, r_req, d_read, r_img, half, whole = check_rates(rates)  # type: ignore[arg-type]
    fast = (prompt * r_in + completion * r_out + requests * r_req + cached * d_read
            + images * r_img + half) // whole  # fmt: skip
    table = ModelPrices("m", None, "test", rates)  # type: ignore[arg-type]
    assert fast == table.cost(prompt, completion, cached, 0, 0, images, requests)


@given(
    rates=st.tuples(
        st.integers(0, 10**19),
        st.integers(0, 10**19),
        st.integers(-(10**19), 0),
    ),
    bound=st.integers(-5, 10**7),
    call=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6)),
)
def test_a_call_within_the_money_gates_token_bound_costs_less_than_the_bound(
    rates: tuple[int, int, int], bound: int, call: tuple[int, int, int]
) -> None:
    """The token gate a money gate turns into never lets through a call the money gate would
    stop: the fast path may skip pricing only because of this."""
    r_in, r_out, d_read = rates
    full = (r_in, r_out, 0, d_read, 0, 0, 0)
    reduced = check_rates(full)
    per_token = token_price(reduced)
    assert per_token is not None
    prompt, completion, cached = call
    cached = min(cached, prompt)
    if prompt + completion < tokens_within(bound, reduced, per_token):
        cost = ModelPrices("m", None, "test", full).cost(prompt, completion, cached)
        assert cost < bound


def test_a_clock_stepped_back_does_not_see_buckets_expired_that_have_not() -> None:
    fast, full, clock = caches(make_policies(False, True, "open"))
    frees_at = clock.now + 0.2
    twelve = QuotaState(
        key="k1", published_at=clock.now, watermark=clock.now,
        scopes={"": {60: (int(clock.now), 12, 0, 0, 0, 0, 0, ((frees_at, 5, 0, 0, 0, 0, 0),))}},
        scope_policies={"": "p"}, sources={},
    )  # fmt: skip
    for cache in (fast, full):
        cache.apply_state(twelve)
    clock.now = frees_at + 0.1  # 5 of the 12 requests have left the window
    assert fast.check("k1", "small", requests=1).allowed
    clock.now = frees_at - 0.1  # an NTP step back: they are in it again
    got, want = fast.check("k1", "small", requests=1), full.check("k1", "small", requests=1)
    assert not want.allowed and fields(got) == fields(want)


def test_a_fast_admission_reads_copies_and_pickles_like_any_decision() -> None:
    import pickle

    fast, _, _ = caches(make_policies(False, True, "open"))
    fast.check("k1", "big", prompt_tokens=10)
    quick = fast.check("k1", "big", prompt_tokens=10)
    assert type(quick[6]) is tuple, "answered from the headroom, remaining not yet built"
    assert quick._asdict()["remaining"] == dict(quick.remaining)
    again = pickle.loads(pickle.dumps(quick))
    assert fields(again) == fields(quick) and again.remaining["tokens_per_minute"] == 4000 - 10
    assert "remaining=mappingproxy({'requests_per_minute': 11" in repr(quick)
