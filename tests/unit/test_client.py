"""The client's lifecycle, its refusal of credentials as keys, and the settings guards of the
defects found reading the code (each once let something wrong through)."""

from __future__ import annotations

import pytest

from quotaflow import (
    ClientState,
    ClientStateError,
    QuotaClient,
    QuotaExceeded,
    RecordError,
    load_settings,
)
from quotaflow.policies import parse_policies
from quotaflow.settings import DEFAULT_KEY_SALT, GatewaySettings, is_loopback
from quotaflow.transports import MemoryTransport

POLICIES = parse_policies(
    {
        "version": 1,
        "policies": [
            {"name": "p", "keys": ["*"], "max_staleness": 600, "limits": {"requests_per_minute": 2}}
        ],
    }
)


def client(transport: MemoryTransport) -> QuotaClient:
    settings = load_settings(client={"journal": False})
    return QuotaClient(settings, policies=POLICIES, transport=transport, follow=False)


@pytest.mark.parametrize(
    "key",
    [
        "sk-live-123",
        "Sk-live-123",
        "SK_live",
        "sK-x",
        "rk-123",
        "Rk-123",
        "BEARER abc",
        "Bearer\tabc",
        "bearer  abc",
        "Bearer\nabc",
    ],
)
def test_a_secret_looking_key_never_reaches_the_transport(key: str) -> None:
    transport = MemoryTransport()
    quota = client(transport)
    with pytest.raises(RecordError, match="looks like a raw API secret") as err:
        quota.record(key, "gpt-4o", prompt_tokens=1)
    assert key not in str(err.value)
    with pytest.raises(RecordError):
        quota.reserve(key, "gpt-4o", prompt_tokens=1, max_output_tokens=1)
    quota.record("team-ok", "gpt-4o", prompt_tokens=1)
    assert quota.close() == 0
    assert [r.key for r in transport.records()] == ["team-ok"]
    assert all(key.encode() not in k for _, _, k, _ in transport.sent)


def test_check_on_an_unopened_client_opens_it_and_on_a_closed_one_refuses() -> None:
    transport = MemoryTransport()
    quota = client(transport)
    assert quota.state is ClientState.UNOPENED
    quota.cache.mark_heard()
    assert quota.check("team", "gpt-4o").allowed
    assert quota.state is ClientState.OPENED and quota.emitter is not None
    # the emitter it started carries what is recorded, and the decision sees it
    quota.record("team", "gpt-4o")
    quota.record("team", "gpt-4o")
    assert quota.check("team", "gpt-4o").reason == "limit"
    quota.close()
    with pytest.raises(ClientStateError, match="closed"):
        quota.check("team", "gpt-4o")
    with pytest.raises(ClientStateError, match="closed"):
        quota.record("team", "gpt-4o")


def test_a_reservation_that_could_not_be_recorded_is_refused_before_it_holds() -> None:
    quota = client(MemoryTransport())
    quota.cache.mark_heard()
    with pytest.raises(RecordError, match="model"):
        quota.reserve("team", "m" * 200, prompt_tokens=1, max_output_tokens=1)
    with pytest.raises(RecordError, match="completion_tokens"):
        quota.reserve("team", "gpt-4o", prompt_tokens=1, max_output_tokens=10**12)
    assert quota.open_reservations == 0 and not quota.cache._held
    quota.close()


def test_reservations_expire_by_the_clients_clock() -> None:
    now = [1_700_000_000.0]
    settings = load_settings(client={"journal": False, "reservation_ttl": 60})
    quota = QuotaClient(settings, policies=POLICIES, transport=MemoryTransport(),
                        follow=False, clock=lambda: now[0])  # fmt: skip
    quota.cache.mark_heard()
    r = quota.reserve("team", "gpt-4o", prompt_tokens=1, max_output_tokens=1)
    assert not r.expired()
    now[0] += 61
    assert r.expired(), "by the injected clock, not the wall clock"
    quota.close()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("10.0.0.5", False),
        ("gateway.internal", False),
    ],
)
def test_the_default_salt_is_a_problem_beyond_loopback_only(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    default = GatewaySettings(listen_host=host)
    assert default.default_salt and default.key_salt.get_secret_value() == DEFAULT_KEY_SALT
    assert (default.salt_problem() is None) is loopback
    if not loopback:
        assert "QUOTAFLOW_GATEWAY__KEY_SALT" in (default.salt_problem() or "")
    assert GatewaySettings(listen_host=host, key_salt="private").salt_problem() is None


def test_by_default_gateway_keys_come_from_the_callers_credential() -> None:
    from quotaflow_producers.gateway.keys import resolve_key

    g = GatewaySettings(key_salt="s")
    chosen = {"x-quotaflow-key": "free-budget", "OpenAI-Organization": "org-free"}
    with_key = resolve_key({**chosen, "Authorization": "Bearer sk-a"}, "10.1.2.3", g)
    assert with_key is not None and with_key.startswith("k_")
    assert resolve_key(chosen, "10.1.2.3", g) == "ip:10.1.2.3"
    opted_in = GatewaySettings(key_salt="s", key_sources=["header", "organization", "api_key"])
    assert resolve_key(chosen, "10.1.2.3", opted_in) == "free-budget"
    assert resolve_key({"OpenAI-Organization": "org-1"}, None, opted_in) == "org-1"


def test_two_apps_in_one_process_keep_their_own_fetch_wait() -> None:
    from quotaflow_stream.app import build_app
    from quotaflow_stream.transport import fetch_max_wait

    fast = build_app(load_settings(worker={"app_id": "fast", "fetch_max_wait_ms": 5}))
    slow = build_app(load_settings(worker={"app_id": "slow", "fetch_max_wait_ms": 900}))
    assert (fetch_max_wait(fast), fetch_max_wait(slow)) == (5, 900)


def test_record_prices_every_billed_unit_from_the_table() -> None:
    """The cost rides on the record, to the micro-dollar of genai-prices, with its version."""
    from tests.support.prices import genai_cost

    transport = MemoryTransport()
    quota = client(transport)
    r = quota.record(
        "team-a", "claude-sonnet-4-5", prompt_tokens=3050, cached_prompt_tokens=2000,
        cache_write_tokens=1000, completion_tokens=300, reasoning_tokens=100,
    )  # fmt: skip
    assert r.cost_micros == genai_cost("claude-sonnet-4-5", 3050, 300, 2000, 1000, 100)
    assert r.price_version == quota.prices.version
    given = quota.record("team-a", "gpt-4o", prompt_tokens=10, cost_micros=7)
    assert (given.cost_micros, given.price_version) == (7, None), "a given cost is kept"
    unknown = quota.record("team-a", "house-model-x", prompt_tokens=10)
    assert (unknown.cost_micros, unknown.priced_as) == (25, "gpt-4o"), "estimated, and says so"
    assert quota.close() == 0
    sent = {rec.model: rec for rec in transport.records()}
    assert sent["claude-sonnet-4-5"].cost_micros == r.cost_micros
    assert sent["claude-sonnet-4-5"].cache_write_tokens == 1000


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"prompt_tokens": "9" * 50}, "prompt_tokens"),
        ({"cached_prompt_tokens": 11}, "cached_prompt_tokens"),
        ({"reasoning_tokens": -1}, "reasoning_tokens"),
        ({"images": 1.5}, "images"),
    ],
)
def test_a_bad_count_is_refused_before_any_price_arithmetic(
    over: dict[str, object], field: str
) -> None:
    """A string count never meets the integer rates (``"9" * rate`` would be a huge string)."""
    quota = client(MemoryTransport())
    args: dict[str, object] = {"prompt_tokens": 10, "completion_tokens": 5, **over}
    with pytest.raises(RecordError, match=field):
        quota.record("team-a", "gpt-4o", **args)  # type: ignore[arg-type]
    quota.close()


def unpriced_client(mode: str, **extra: object) -> QuotaClient:
    policies = parse_policies(
        {"policies": [{"name": "p", "keys": ["*"], "max_staleness": 600, "unpriced": mode,
                       "limits": {"requests_per_minute": 100}, **extra}]}
    )  # fmt: skip
    settings = load_settings(client={"journal": False})
    return QuotaClient(settings, policies=policies, transport=MemoryTransport(), follow=False)


def test_each_policy_says_what_an_unpriced_model_costs() -> None:
    free = unpriced_client("free")
    r = free.record("team-a", "house-model-x", prompt_tokens=10)
    assert (r.cost_micros, r.priced_as) == (0, "free")
    assert free.check("team-a", "house-model-x").allowed
    free.close()
    estimate = unpriced_client("estimate", unpriced_as="gpt-4o-mini")
    r = estimate.record("team-a", "house-model-x", prompt_tokens=1_000_000)
    assert (r.cost_micros, r.priced_as) == (150_000, "gpt-4o-mini")
    assert estimate.record("team-a", "gpt-4o", prompt_tokens=10).priced_as is None
    estimate.close()
    reject = unpriced_client("reject")
    reject.cache.mark_heard()
    d = reject.check("team-a", "house-model-x")
    assert (d.allowed, d.reason, d.policy) == (False, "unpriced", "p")
    assert reject.check("team-a", "gpt-4o").allowed, "priced models pass"
    with pytest.raises(QuotaExceeded):
        reject.reserve("team-a", "house-model-x", prompt_tokens=1, max_output_tokens=1)
    r = reject.record("team-a", "house-model-x", prompt_tokens=10)
    assert (r.cost_micros, r.priced_as) == (None, None), "what happened is still recorded"
    reject.close()


def test_an_estimate_at_a_model_without_a_price_is_refused_at_start() -> None:
    from quotaflow import ConfigError

    with pytest.raises(ConfigError, match=r"unpriced_as 'gpt-4o-mnii' has no price.*gpt-4o-mini"):
        unpriced_client("estimate", unpriced_as="gpt-4o-mnii")
