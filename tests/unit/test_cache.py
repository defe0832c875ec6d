"""The request-path logic, with an injected clock: no broker, no sleeping."""

from __future__ import annotations

import pytest

from quotaflow.cache import QuotaCache
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
    key: str, published_at: float, req: int, pt: int, ct: int, sources: dict[str, float]
) -> QuotaState:
    return QuotaState(
        key=key,
        published_at=published_at,
        watermark=published_at,
        scopes={"": {60: (MINUTE_START, req, pt, ct)}},
        scope_policies={"": "p"},
        sources=sources,
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
        cache.add_usage("k1", "small", T0, 1, 10, 0)
    d = cache.check("k1", "small", prompt_tokens=10)
    assert not d.allowed
    assert d.limit == "requests_per_minute" and d.policy == "p"
    assert d.retry_after == pytest.approx(20.0) and d.reset_at == MINUTE_START + 60
    assert d.remaining["requests_per_minute"] == 0


def test_state_from_the_stream_denies_other_instances_usage(cache: QuotaCache) -> None:
    cache.apply_state(state("k1", T0, 2, 900, 50, {"other": T0}))
    d = cache.check("k1", "small", prompt_tokens=40, completion_tokens=20)
    assert not d.allowed and d.limit == "tokens_per_minute"
    assert cache.check("k1", "small", prompt_tokens=30, completion_tokens=20).allowed


def test_acknowledged_usage_is_not_counted_twice(cache: QuotaCache, clock: Clock) -> None:
    cache.add_usage("k1", "small", T0 - 2, 1, 400, 0)
    cache.add_usage("k1", "small", T0 - 1, 1, 400, 0)
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
    clock.now = d.reset_at + 0.001  # type: ignore[operator]
    cache.mark_heard()
    assert cache.check("k1", "small").allowed


def test_model_policy_limits_only_that_model(cache: QuotaCache) -> None:
    cache.add_usage("k1", "big", T0, 1, 250, 0)
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
    c.add_usage("k1", "x", T0, 1, 0, 0)
    d = c.check("k1", "x")
    assert d.limit == "requests_per_hour"
    assert d.reset_at == (T0 // 3600 + 1) * 3600


@pytest.mark.parametrize("mode", ["open", "closed", "local"])
def test_fail_modes_apply_once_the_stream_is_silent(clock: Clock, mode: str) -> None:
    c = QuotaCache(policies(fail_mode=mode, requests_per_minute=4), "me", clock=clock)
    c.mark_heard()
    c.add_usage("k1", "x", T0, 1, 0, 0)
    c.add_usage("k1", "x", T0, 1, 0, 0)
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


def test_pending_usage_expires_if_never_acknowledged(clock: Clock) -> None:
    c = QuotaCache(policies(), "me", clock=clock, pending_ttl=30)
    c.add_usage("k1", "x", T0, 1, 0, 0)
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
    assert rows["requests_per_minute"].reset_at == MINUTE_START + 60
