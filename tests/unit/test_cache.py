"""The request-path logic, with an injected clock: no broker, no sleeping."""

from __future__ import annotations

from random import Random

import pytest

from quotaflow.cache import DRAW_HOLD, QuotaCache
from quotaflow.policies import PolicySet, parse_policies
from quotaflow.state import QuotaState

MINUTE_START = 1_700_000_040  # a multiple of 60
T0 = MINUTE_START + 40.0  # 40 s into that minute window


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def policies(fail_mode: str = "open", **limits: int) -> PolicySet:
    return parse_policies(
        {
            "policies": [
                {
                    "name": "p",
                    "keys": ["k*"],
                    "limits": limits or {"requests_per_minute": 5, "tokens_per_minute": 1000},
                    "fail_mode": fail_mode,
                    "max_staleness": 5,
                    "expected_instances": 2,
                },
                {
                    "name": "m",
                    "keys": ["k*"],
                    "models": ["big"],
                    "limits": {"tokens_per_minute": 300},
                },
            ]
        }
    )


def state(
    key: str,
    published_at: float,
    req: int,
    pt: int,
    ct: int,
    sources: dict[str, float],
    *,
    began: float = T0 - 20,
    shares: dict[str, float] | None = None,
) -> QuotaState:
    """A state whose minute window holds all its usage in one bucket begun at ``began``."""
    expiry = (began + 60.125, req, pt, ct, 0, 0, 0)
    return QuotaState(
        key=key,
        published_at=published_at,
        watermark=published_at,
        scopes={"": {60: (int(published_at), req, pt, ct, 0, 0, 0, (expiry,))}},
        scope_policies={"": "p"},
        sources=sources,
        shares=shares or {},
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> QuotaCache:
    c = QuotaCache(policies(), "me", clock=clock)
    c.mark_heard()
    return c


def test_unknown_key_without_policy_is_allowed(cache: QuotaCache) -> None:
    d = cache.check("nobody")
    assert d.allowed and d.reason == "no_policy"


def test_local_usage_counts_before_any_state(cache: QuotaCache) -> None:
    for _ in range(5):
        assert cache.check("k1", "small", prompt_tokens=10).allowed
        cache.add_usage("k1", (T0, "small", 1, 10, 0, 0, 0, 0))
    d = cache.check("k1", "small", prompt_tokens=10)
    assert not d.allowed
    assert d.limit == "requests_per_minute" and d.policy == "p"
    # the window slides: the first call frees 60.125 s after the 0.125 s bucket it fell in began
    assert d.retry_after == pytest.approx(60.125) and d.reset_at == T0 + 60.125
    assert d.remaining["requests_per_minute"] == 0


def test_state_from_the_stream_denies_other_instances_usage(cache: QuotaCache) -> None:
    cache.apply_state(state("k1", T0, 2, 900, 50, {"other": T0}))
    d = cache.check("k1", "small", prompt_tokens=40, completion_tokens=20)
    assert not d.allowed and d.limit == "tokens_per_minute"
    assert cache.check("k1", "small", prompt_tokens=30, completion_tokens=20).allowed


def test_acknowledged_usage_is_not_counted_twice(cache: QuotaCache, clock: Clock) -> None:
    cache.add_usage("k1", (T0 - 2, "small", 1, 400, 0, 0, 0, 0))
    cache.add_usage("k1", (T0 - 1, "small", 1, 400, 0, 0, 0, 0))
    assert cache.pending_count("k1") == 2
    # The stream has counted our first record only (sources["me"] = its ts).
    cache.apply_state(state("k1", T0, 1, 400, 0, {"me": T0 - 2}))
    assert cache.pending_count("k1") == 1
    d = cache.check("k1", "small", prompt_tokens=0)
    assert d.remaining["tokens_per_minute"] == 200  # 1000 - 400 counted - 400 pending


def test_older_state_is_ignored(cache: QuotaCache) -> None:
    assert cache.apply_state(state("k1", T0, 4, 0, 0, {}))
    assert not cache.apply_state(state("k1", T0 - 1, 0, 0, 0, {}))
    assert cache.state("k1").scopes[""][60][1] == 4  # type: ignore[union-attr]


def test_window_reset_allows_again_without_a_new_state(cache: QuotaCache, clock: Clock) -> None:
    cache.apply_state(state("k1", T0, 5, 0, 0, {}))
    d = cache.check("k1", "small")
    assert not d.allowed
    assert d.reset_at == T0 + 40.125, "the state's bucket began at T0 - 20"
    clock.now = d.reset_at - 0.001  # type: ignore[operator]
    cache.mark_heard()
    assert not cache.check("k1", "small").allowed
    clock.now = d.reset_at  # type: ignore[assignment]
    assert cache.check("k1", "small").allowed


def test_model_policy_limits_only_that_model(cache: QuotaCache) -> None:
    cache.add_usage("k1", (T0, "big", 1, 250, 0, 0, 0, 0))
    assert not cache.check("k1", "big", prompt_tokens=100).allowed
    denied = cache.check("k1", "big", prompt_tokens=100)
    assert denied.limit == "big/tokens_per_minute" and denied.policy == "m"
    assert cache.check("k1", "small", prompt_tokens=100).allowed


def test_zero_sized_check_denies_an_exhausted_key(cache: QuotaCache) -> None:
    cache.apply_state(state("k1", T0, 0, 1000, 0, {}))
    assert not cache.check("k1", "small", requests=0).allowed


def test_denial_reports_the_longest_wait(clock: Clock) -> None:
    c = QuotaCache(policies(requests_per_minute=1, requests_per_hour=1), "me", clock=clock)
    c.mark_heard()
    c.add_usage("k1", (T0, "x", 1, 0, 0, 0, 0, 0))
    d = c.check("k1", "x")
    assert d.limit == "requests_per_hour"
    assert d.reset_at == (T0 // 30) * 30 + 3630, "the hour window's 30 s bucket frees last"


@pytest.mark.parametrize("mode", ["open", "closed", "local"])
def test_fail_modes_apply_once_the_stream_is_silent(clock: Clock, mode: str) -> None:
    c = QuotaCache(policies(fail_mode=mode, requests_per_minute=4), "me", clock=clock)
    c.mark_heard()
    c.add_usage("k1", (T0, "x", 1, 0, 0, 0, 0, 0))
    c.add_usage("k1", (T0, "x", 1, 0, 0, 0, 0, 0))
    c.apply_state(state("k1", T0, 2, 0, 0, {"me": T0}))  # stream acknowledged both
    assert c.check("k1", "x").allowed and c.check("k1", "x").reason == "ok"
    clock.now = T0 + 6  # silent for longer than max_staleness (5 s)
    d = c.check("k1", "x")
    if mode == "open":
        assert d.allowed and d.reason == "stale_open"
    elif mode == "closed":
        assert not d.allowed and d.reason == "stale_closed" and d.retry_after > 0
    else:
        # local: limit / expected_instances = 4 / 2 = 2, and this instance already used 2
        assert not d.allowed and d.limit == "requests_per_minute"
        assert d.state_age == pytest.approx(6.0)


def test_local_fail_mode_counts_each_call_once_with_two_limits_on_one_window(
    clock: Clock,
) -> None:
    """Requests and tokens per minute share the minute window: one call is one request."""
    c = QuotaCache(
        policies(fail_mode="local", requests_per_minute=8, tokens_per_minute=10_000), "me",
        clock=clock,
    )  # fmt: skip
    c.mark_heard()
    c.add_usage("k1", (T0, "x", 1, 100, 0, 0, 0, 0))
    clock.now = T0 + 6  # stale: this instance's own usage against limit / expected_instances
    d = c.check("k1", "x", prompt_tokens=10)
    assert d.allowed and d.reason == "stale_local"
    assert d.remaining["requests_per_minute"] == 8 // 2 - 1 - 1
    assert d.remaining["tokens_per_minute"] == 10_000 // 2 - 100 - 10


def test_pending_usage_expires_if_never_acknowledged(clock: Clock) -> None:
    c = QuotaCache(policies(), "me", clock=clock, pending_ttl=30)
    c.add_usage("k1", (T0, "x", 1, 0, 0, 0, 0, 0))
    clock.now = T0 + 31
    c.expire()
    assert c.pending_count("k1") == 0


def test_denial_carries_the_limits_figures_and_usage_lists_every_limit(
    cache: QuotaCache,
) -> None:
    cache.apply_state(state("k1", T0, 2, 900, 50, {}))
    d = cache.check("k1", "small", prompt_tokens=60)
    assert (d.used, d.ceiling, d.requested) == (950, 1000, 60)
    rows = {u.name: u for u in cache.usage("k1", "small")}
    assert rows["tokens_per_minute"].used == 950 and rows["tokens_per_minute"].remaining == 50
    assert rows["requests_per_minute"].used == 2
    assert rows["requests_per_minute"].reset_at == T0 + 60.125


def test_state_usage_frees_as_its_buckets_expire(clock: Clock) -> None:
    c = QuotaCache(policies(requests_per_minute=5), "me", clock=clock)
    c.mark_heard()
    two_buckets = QuotaState(
        key="k1", published_at=T0, watermark=T0,
        scopes={"": {60: (int(T0), 5, 0, 0, 0, 0, 0,
                          ((int(T0) + 3, 2, 0, 0, 0, 0, 0), (int(T0) + 9, 3, 0, 0, 0, 0, 0)))}},
        scope_policies={"": "p"},
    )  # fmt: skip
    c.apply_state(two_buckets)
    assert not c.check("k1").allowed
    assert c.check("k1").reset_at == T0 + 3
    clock.now = T0 + 3
    assert c.check("k1", requests=2).allowed and not c.check("k1", requests=3).allowed
    clock.now = T0 + 9
    assert c.check("k1", requests=5).allowed


class Unlucky(Random):
    """Every chance admission fails: a share admits only calls that fit in it."""

    def random(self) -> float:
        return 0.9999


def test_budget_share_caps_admissions_until_the_next_state(clock: Clock) -> None:
    c = QuotaCache(policies(requests_per_minute=100), "me", clock=clock, rng=Unlucky())
    c.mark_heard()
    # 60 counted, 40 left; this instance holds a quarter of it until the next state
    c.apply_state(state("k1", T0, 60, 0, 0, {}, shares={"me": 0.25, "b": 0.5, "c": 0.25}))
    for i in range(10):
        assert c.check("k1").allowed, i
        c.add_usage("k1", (T0, "x", 1, 0, 0, 0, 0, 0))
    d = c.check("k1")
    assert not d.allowed and d.reason == "share" and d.retry_after == pytest.approx(0.05)
    assert d.remaining["requests_per_minute"] == 29, "the fleet's budget is not exhausted"
    # the next state counts our 10 and the others' 20: our quarter of the 10 left is 2
    c.apply_state(state("k1", T0 + 0.1, 90, 0, 0, {"me": T0}, shares={"me": 0.25, "b": 0.75}))
    assert c.check("k1", requests=2).allowed and not c.check("k1", requests=3).allowed


def test_a_call_larger_than_what_is_left_of_the_share_is_admitted_by_chance(
    clock: Clock,
) -> None:
    admitted = 0
    for seed in range(400):
        c = QuotaCache(policies(requests_per_minute=100), "me", clock=clock, rng=Random(seed))
        c.mark_heard()
        # 2 left, a quarter each: half a call's worth for this instance
        c.apply_state(state("k1", T0, 98, 0, 0, {}, shares={"me": 0.25, "b": 0.75}))
        d = c.check("k1")
        assert d.allowed or d.reason == "share"
        admitted += d.allowed
    assert 160 <= admitted <= 240, admitted  # ~50 %
    c = QuotaCache(policies(requests_per_minute=100), "me", clock=clock, rng=Random(0))
    c.mark_heard()
    c.apply_state(state("k1", T0, 90, 0, 0, {"me": T0}, shares={"me": 0.25, "b": 0.75}))
    c.add_usage("k1", (T0 + 1, "x", 3, 0, 0, 0, 0, 0))  # 3 > its share of 2.5: no more chances
    assert all(c.check("k1").reason == "share" for _ in range(50))


class Draws(Random):
    """Chance admissions from a script of draws (then always lucky); counts the draws."""

    def __init__(self, *draws: float) -> None:
        super().__init__(0)
        self.draws = list(draws)
        self.drawn = 0

    def random(self) -> float:
        self.drawn += 1
        return self.draws.pop(0) if self.draws else 0.0


def test_a_lost_chance_holds_until_the_next_state_however_often_the_caller_retries(
    clock: Clock,
) -> None:
    """One draw per key and state: a caller retrying every 50 ms (as a share denial tells it)
    must not draw again and again, or the instance spends its share several times over."""
    rng = Draws(0.9999)
    c = QuotaCache(policies(requests_per_minute=100), "me", clock=clock, rng=rng)
    c.mark_heard()
    c.apply_state(state("k1", T0, 98, 0, 0, {}, shares={"me": 0.25, "b": 0.75}))
    assert c.check("k1").reason == "share" and rng.drawn == 1
    for _ in range(5):
        clock.now += 0.05
        assert c.check("k1").reason == "share"
    assert rng.drawn == 1, "no new chance within the same state"
    # the next state gives one: lucky this time
    c.apply_state(state("k1", T0 + 0.3, 98, 0, 0, {}, shares={"me": 0.25, "b": 0.75}))
    assert c.check("k1").allowed and rng.drawn == 2
    # a key no state comes for gets its next chance after DRAW_HOLD
    rng.draws = [0.9999]
    c.note_fleet("worker-1", 200)  # 1/200 of 100: half a call
    assert c.check("k9").reason == "share" and rng.drawn == 3
    clock.now += DRAW_HOLD - 0.01
    assert c.check("k9").reason == "share" and rng.drawn == 3
    clock.now += 0.02
    c.expire()
    assert c.check("k9").allowed and rng.drawn == 4


def test_share_of_a_newcomer_and_of_a_key_without_state(clock: Clock) -> None:
    c = QuotaCache(policies(requests_per_minute=100), "me", clock=clock, rng=Unlucky())
    c.mark_heard()
    c.note_fleet("worker-1", 10)
    assert c.check("k9", requests=10).allowed and not c.check("k9", requests=11).allowed
    c.apply_state(state("k1", T0, 0, 0, 0, {}, shares={"a": 0.5, "b": 0.5}))
    assert c.check("k1", requests=33).allowed and not c.check("k1", requests=34).allowed


def test_budget_shares_can_be_switched_off(clock: Clock) -> None:
    off = parse_policies(
        {"policies": [{"name": "p", "keys": ["k*"], "budget_shares": False,
                       "limits": {"requests_per_minute": 100}}]}
    )  # fmt: skip
    c = QuotaCache(off, "me", clock=clock)
    c.mark_heard()
    c.apply_state(state("k1", T0, 60, 0, 0, {}, shares={"me": 0.25, "b": 0.75}))
    assert c.check("k1", requests=40).allowed and not c.check("k1", requests=41).allowed


def shadowed(**over: object) -> PolicySet:
    """A tight key-wide policy in shadow mode beside an enforcing model policy."""
    return parse_policies({"policies": [
        {"name": "new-limit", "keys": ["k*"], "limits": {"requests_per_minute": 2},
         "enforce": False, **over},
        {"name": "m", "keys": ["k*"], "models": ["big"], "limits": {"tokens_per_minute": 300}},
    ]})  # fmt: skip


def test_shadow_mode_admits_what_it_would_deny_and_says_so(clock: Clock) -> None:
    c = QuotaCache(shadowed(), "me", clock=clock)
    c.mark_heard()
    for _ in range(2):
        d = c.check("k1", "small")
        assert d.allowed and d.shadow is None
        c.add_usage("k1", (T0, "small", 1, 0, 0, 0, 0, 0))
    over = c.check("k1", "small")
    assert over.allowed and over.reason == "ok" and over.shadow == "requests_per_minute"
    assert c.check("k1", "small").shadow == "requests_per_minute"
    assert c.shadow_denials == {"requests_per_minute": 2}
    # an enforcing policy beside it still denies
    c.add_usage("k1", (T0, "big", 1, 300, 0, 0, 0, 0))
    big = c.check("k1", "big", prompt_tokens=10)
    assert not big.allowed and big.limit == "big/tokens_per_minute"
    # once enforced, the same usage is denied
    c.policies = parse_policies({"policies": [{"name": "new-limit", "keys": ["k*"],
                                              "limits": {"requests_per_minute": 2}}]})  # fmt: skip
    assert not c.check("k1", "small").allowed


def test_shadow_mode_admits_when_a_closed_policy_is_stale(clock: Clock) -> None:
    c = QuotaCache(shadowed(fail_mode="closed", max_staleness=5), "me", clock=clock)
    c.mark_heard()
    clock.now += 10
    d = c.check("k1", "small")
    assert d.allowed and d.shadow == "stale"


def test_a_policy_change_mid_window_keeps_counts_and_a_removed_policy_falls_to_the_next(
    clock: Clock,
) -> None:
    """Limits change, counts do not: usage recorded before the change counts against the new
    limit; a key whose policy was removed falls to the next match (here the default)."""
    two = parse_policies({"policies": [
        {"name": "team", "keys": ["k1"], "limits": {"requests_per_minute": 10}},
        {"name": "fallback", "default": True, "limits": {"requests_per_minute": 3}},
    ]})  # fmt: skip
    c = QuotaCache(two, "me", clock=clock)
    c.mark_heard()
    for _ in range(4):
        assert c.check("k1").allowed
        c.add_usage("k1", (T0, "m", 1, 0, 0, 0, 0, 0))
    assert c.check("k1").policy == "team"
    c.adopt(parse_policies({"policies": [two.policies[1].model_dump(exclude_none=True)]}),
            None, 2)  # fmt: skip
    d = c.check("k1")
    assert not d.allowed and d.policy == "fallback" and d.used == 4 and d.ceiling == 3
    assert d.policy_version == 2
    c.adopt(two, None, 3)  # raised again: admits at once
    assert c.check("k1").allowed and c.check("k1").remaining["requests_per_minute"] == 5


def test_a_hot_keys_calls_of_one_slot_are_one_pending_entry_counted_in_full(
    cache: QuotaCache,
) -> None:
    """Checks scan pending entries: 1,000 calls in 20 ms are one entry, counted as 1,000
    calls, and dropped only when the stream has counted the newest of them."""
    base = T0 - 1.0  # the start of a 20 ms slot
    for i in range(50):
        cache.add_usage("k1", (base + i * 0.0003, "small", 1, 10, 0, 0, 0, 0))
    assert len(cache._pending["k1"]) == 1 and cache.pending_count("k1") == 50
    cache.add_usage("k1", (base + 0.05, "small", 1, 10, 0, 0, 0, 0))  # the next slot
    cache.add_usage("k1", (base + 0.051, "large", 1, 10, 0, 0, 0, 0))  # another model
    assert len(cache._pending["k1"]) == 3 and cache.pending_count("k1") == 52
    d = cache.check("k1", "small", prompt_tokens=0, requests=0)
    assert d.remaining["tokens_per_minute"] == 1000 - 520
    # the stream counted up to the middle of the first slot: none of it may be dropped yet
    cache.apply_state(state("k1", T0, 25, 250, 0, {"me": base + 24 * 0.0003}))
    assert cache.pending_count("k1") == 52, "a merged entry goes only when all of it is counted"
    cache.apply_state(state("k1", T0 + 0.1, 50, 500, 0, {"me": base + 49 * 0.0003}))
    assert cache.pending_count("k1") == 2
