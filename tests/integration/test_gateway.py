"""The metering gateway with the official openai client, in front of the local upstream, with
usage going to the real broker."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from quotaflow import QuotaClient, key_id
from quotaflow.settings import DEFAULT_KEY_SOURCES, GatewaySettings, QuotaflowSettings
from quotaflow.tokens import count_request, count_text
from quotaflow.units import dollars
from quotaflow_producers.gateway.runner import GatewayThread
from quotaflow_producers.testing import REPLY, OpenAIStub
from quotaflow_stream.harness import DevStack, free_port
from quotaflow_stream.topics import ensure_topics
from tests.support import pipeline_settings, wait_for
from tests.support.fuzzing import json_junk
from tests.support.gateways import GatewayFactory, flush, gateway_factory, usage_records
from tests.support.prices import genai_cost

pytestmark = pytest.mark.integration

CALLER_SECRET = "sk-caller-secret-0123456789abcdef"
#: Tokens the local upstream adds to what it reports (see OpenAIStub.usage_offset).
OFFSET = 1000
TIGHT_SECRET = "sk-tight-caller-0123456789abcdef"
OTHER_SECRET = "sk-other-caller-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "Tell me about gateways."}]
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")

POLICIES = """
version: 1
policies:
  - {name: roomy, keys: ["gw-*", "k_*"], max_staleness: 600,
     limits: {requests_per_minute: 100000, tokens_per_minute: 1000000}}
  - {name: tight, keys: ["tight-*"], max_staleness: 600,
     limits: {requests_per_minute: 3, tokens_per_minute: 100000}}
  - {name: load, keys: ["load-*"], max_staleness: 600, default_max_output_tokens: 40,
     limits: {tokens_per_minute: 1500}}
  - {name: routes, keys: ["routes-*"], max_staleness: 600, count_routes: ["/v1/models*"],
     limits: {requests_per_minute: 2}}
  - {name: uncounted, keys: ["uncounted-*"], max_staleness: 600,
     limits: {requests_per_minute: 2}}
  - {name: priced-only, keys: ["priced-*"], max_staleness: 600, unpriced: reject,
     limits: {requests_per_minute: 100}}
  - {name: budget, keys: ["budget-*"], max_staleness: 600, limits: {cost_per_minute: 0.05}}
"""


@pytest.fixture(scope="module")
def base_settings(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> QuotaflowSettings:
    workdir = tmp_path_factory.mktemp("gateway")
    (workdir / "policies.yaml").write_text(POLICIES)
    settings = pipeline_settings(stack, workdir, policies_file=workdir / "policies.yaml")
    # the tight key of a caller known by its API key alone (its id depends on this run's salt)
    tight_id = key_id(TIGHT_SECRET, settings.gateway.key_salt.get_secret_value())
    (workdir / "policies.yaml").write_text(
        POLICIES
        + f"""  - {{name: tight-caller, keys: ["{tight_id}"], max_staleness: 600,
     limits: {{requests_per_minute: 3, tokens_per_minute: 100000}}}}
"""
    )
    ensure_topics(settings)
    return settings


@pytest.fixture(scope="module")
def make_gateway(base_settings: QuotaflowSettings, stub: OpenAIStub) -> Iterator[GatewayFactory]:
    yield from gateway_factory(base_settings, f"http://127.0.0.1:{stub.port}")


@pytest.fixture(scope="module")
def gateway(make_gateway: GatewayFactory) -> GatewayThread:
    return make_gateway()


def client(gw: GatewayThread, key: str | None = None) -> openai.OpenAI:
    headers = {"x-quotaflow-key": key} if key else None
    return openai.OpenAI(base_url=gw.base_url, api_key=CALLER_SECRET, max_retries=0,
                         default_headers=headers)  # fmt: skip


def test_chat_embeddings_and_streams_with_headers_and_exact_usage(
    gateway: GatewayThread, stub: OpenAIStub, base_settings: QuotaflowSettings
) -> None:
    c = client(gateway, key="gw-exact")
    first = len(stub.reported)
    # the provider's counts differ from the gateway's estimate: each record says whose it took
    stub.usage_offset = OFFSET
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == REPLY
    for name in ("requests", "tokens"):
        assert raw.headers[f"x-ratelimit-limit-{name}"].isdigit()
        assert raw.headers[f"x-ratelimit-remaining-{name}"].isdigit()
        assert DURATION.match(raw.headers[f"x-ratelimit-reset-{name}"]), raw.headers
    assert raw.headers["x-ratelimit-limit-requests"] == "100000"
    streamed = c.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == REPLY
    plain_stream = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in plain_stream) == REPLY
    emb = c.embeddings.create(model="text-embedding-3-small", input=["alpha beta", "gamma"])
    assert len(emb.data) == 2

    async def run_async() -> str:
        ac = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CALLER_SECRET, max_retries=0,
                                default_headers={"x-quotaflow-key": "gw-exact"})  # fmt: skip
        resp = await ac.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        stream = await ac.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
        await ac.close()
        return (resp.choices[0].message.content or "") + text

    try:
        assert asyncio.run(run_async()) == REPLY + REPLY
    finally:
        stub.usage_offset = 0
    reported = stub.reported[first:]
    assert len(reported) == 6
    flush(gateway)
    records = [r for _, r in usage_records(base_settings) if r.key == "gw-exact"]
    assert len(records) == 6, "one record per call, none twice"
    # what the gateway counts itself: the prompt, and the reply as it relayed it
    chat = count_request({"model": "gpt-4o", "messages": MESSAGES}).tokens
    mini = count_request({"model": "gpt-4o-mini", "messages": MESSAGES}).tokens
    emb_in = {"model": "text-embedding-3-small", "input": ["alpha beta", "gamma"]}
    reply, mini_reply = count_text(REPLY, "gpt-4o"), count_text(REPLY, "gpt-4o-mini")
    took = sorted((r.prompt_tokens, r.completion_tokens, r.estimated) for r in records)
    # calls the provider reported usage for carry its figures (the offset shows they are its
    # own); the two streams without a usage chunk (the plain one, the async one) are counted
    # from what was relayed, and say so
    assert took == sorted(
        [(chat + OFFSET, reply + OFFSET, False)] * 3  # chat, streamed with usage, async chat
        + [(count_request(emb_in).tokens + OFFSET, 0, False)]  # embeddings
        + [(mini, mini_reply, True), (chat, reply, True)]
    )


def test_cached_and_reasoning_tokens_and_the_cost_reach_the_audit_trail(
    gateway: GatewayThread, stub: OpenAIStub, base_settings: QuotaflowSettings
) -> None:
    """Through the gateway, plain and streamed, the v2 record read back from the broker has
    the upstream's cached and reasoning tokens and genai-prices' cost for them."""
    c = client(gateway, key="gw-billed")
    stub.cached_tokens, stub.reasoning_tokens = 6, 30
    try:
        plain = c.chat.completions.with_raw_response.create(model="o3-mini", messages=MESSAGES)
        streamed = c.chat.completions.create(
            model="o3-mini", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    finally:
        stub.cached_tokens = stub.reasoning_tokens = 0
    reported = stub.reported[-2:]
    flush(gateway)
    records = [r for _, r in usage_records(base_settings) if r.key == "gw-billed"]
    assert len(records) == 2
    for record, upstream in zip(records, reported, strict=True):
        assert (record.prompt_tokens, record.completion_tokens) == (
            upstream["prompt_tokens"], upstream["completion_tokens"],
        )  # fmt: skip
        assert (record.cached_prompt_tokens, record.reasoning_tokens) == (6, 30)
        assert record.cost_micros == genai_cost(
            "o3-mini", record.prompt_tokens, record.completion_tokens, cached=6, reasoning=30,
            provider="openai",
        )  # fmt: skip
        assert record.price_version == gateway.gateway.quota.prices.version
        assert record.status == "ok" and not record.estimated
    # the plain answer says what it cost (a stream's headers go before its usage is known)
    cost = records[0].cost_micros
    assert cost is not None
    assert plain.headers["x-quotaflow-cost-usd"] == f"{cost // 10**6}.{cost % 10**6:06d}"
    assert plain.headers["x-quotaflow-price-version"] == records[0].price_version


def test_api_key_becomes_an_hmac_id_and_never_leaves(
    gateway: GatewayThread, stub: OpenAIStub, base_settings: QuotaflowSettings
) -> None:
    c = client(gateway)  # no key header: the counter key comes from the API key
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert stub.authorizations[-1] == f"Bearer {CALLER_SECRET}", "the caller's key passes"
    other = openai.OpenAI(base_url=gateway.base_url, api_key=OTHER_SECRET, max_retries=0)
    other.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    flush(gateway)
    records = usage_records(base_settings)
    salt = base_settings.gateway.key_salt.get_secret_value()
    mine, theirs = key_id(CALLER_SECRET, salt), key_id(OTHER_SECRET, salt)
    # the documented id, computed here, not by the code under test: "k_" and the first 24 hex
    # digits of HMAC-SHA256(salt, API key)
    expected = "k_" + hmac.new(salt.encode(), CALLER_SECRET.encode(), "sha256").hexdigest()[:24]
    assert mine == expected and mine != theirs
    keys = [r.key for _, r in records]
    assert keys.count(mine) == 1 and keys.count(theirs) == 1
    assert all(CALLER_SECRET.encode() not in raw for raw, _ in records)
    # the id an operator puts in policies: `quotaflow key-id` prints the same one
    env = {**os.environ, "QUOTAFLOW_GATEWAY__KEY_SALT": salt}
    printed = subprocess.run(
        [sys.executable, "-m", "quotaflow", "key-id"], input=f"{CALLER_SECRET}\n{OTHER_SECRET}\n",
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    assert printed == [mine, theirs]


def test_upstream_key_replaces_the_callers(make_gateway: GatewayFactory, stub: OpenAIStub) -> None:
    gw = make_gateway(upstream_api_key="sk-upstream-secret")
    client(gw, key="gw-replaced").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert stub.authorizations[-1] == "Bearer sk-upstream-secret"


def test_over_the_limit_is_a_429_with_openai_shape_and_headers(gateway: GatewayThread) -> None:
    c = client(gateway, key="tight-team")
    for _ in range(3):
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    resp = err.value.response
    assert resp.status_code == 429
    assert 1 <= int(resp.headers["retry-after"]) <= 61  # a minute slides in 1 s buckets
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert resp.headers["x-ratelimit-limit-requests"] == "3"
    body = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["code"] == "rate_limit_exceeded" and body["type"] == "requests"
    assert "requests_per_minute" in body["message"]
    assert "Limit 3, Used 3, Requested 1" in body["message"]
    assert "try again in" in body["message"]


def test_a_spent_budget_is_insufficient_quota_in_dollars(
    gateway: GatewayThread, stub: OpenAIStub, base_settings: QuotaflowSettings
) -> None:
    """A call is admitted by its worst case at the model's prices (4,000 output tokens of
    gpt-4o: $0.04 of a $0.05 budget), charged what the upstream says it used (~$0.025), and
    the answer says what is left; the next worst case no longer fits: OpenAI's
    insufficient_quota, in dollars."""
    c = client(gateway, key="budget-team")
    stub.usage_offset = 2000
    try:
        first = c.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=4000
        )
    finally:
        stub.usage_offset = 0
    flush(gateway)
    [record] = [r for _, r in usage_records(base_settings) if r.key == "budget-team"]
    cost = record.cost_micros
    assert cost is not None and cost == genai_cost(
        "gpt-4o", record.prompt_tokens, record.completion_tokens, provider="openai"
    )
    assert first.headers["x-quotaflow-budget-limit"] == "cost_per_minute"
    assert first.headers["x-quotaflow-budget-limit-usd"] == "0.050000"
    assert first.headers["x-quotaflow-budget-remaining-usd"] == dollars(50_000 - cost)
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4000)
    resp = err.value.response
    body = resp.json()["error"]
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1
    assert body["code"] == "insufficient_quota" and body["type"] == "insufficient_quota"
    assert f"cost_per_minute of budget-team: ${dollars(cost)} used of $0.050000" in body["message"]
    # a call whose worst case fits is still served
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100)


def test_access_log_line_per_call_unless_turned_off(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="quotaflow_producers.gateway.server")
    for access_log, lines in ((True, 1), (False, 0)):
        gw = make_gateway(access_log=access_log)
        caplog.clear()
        r = httpx.post(gw.base_url + "/chat/completions", json={"model": "gpt-4o",
                       "messages": MESSAGES}, headers={"x-quotaflow-key": "gw-logged"},
                       timeout=10)  # fmt: skip
        assert r.status_code == 200
        logged = [m for m in caplog.messages if "/v1/chat/completions key=gw-logged" in m]
        assert len(logged) == lines, (access_log, caplog.messages)


def test_custom_rate_limit_response_file(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    template = tmp_path / "429.json"
    template.write_text(json.dumps({
        "statusCode": 429,
        "headers": [{"name": "Retry-After", "value": "@dynamic"},
                    {"name": "x-custom", "value": "slow down"}],
        "body": {"error": {"message": "Custom quota message", "code": "custom_429",
                           "retry_after": "@dynamic"}},
    }))  # fmt: skip
    gw = make_gateway(rate_limit_response_file=str(template))
    url = gw.base_url + "/chat/completions"
    headers = {"x-quotaflow-key": "tight-custom", "Authorization": "Bearer x"}
    payload = {"model": "gpt-4o", "messages": MESSAGES}
    codes = [httpx.post(url, json=payload, headers=headers).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    denied = httpx.post(url, json=payload, headers=headers)
    assert denied.status_code == 429 and denied.headers["x-custom"] == "slow down"
    seconds = denied.headers["Retry-After"]
    assert seconds.isdigit() and denied.json()["error"]["retry_after"] == seconds
    assert "x-ratelimit-remaining-requests" in denied.headers


def test_bad_input_gets_clear_openai_errors(make_gateway: GatewayFactory, stub: OpenAIStub) -> None:
    gw = make_gateway(max_body_bytes=4096, unknown_models="reject")
    url = gw.base_url + "/chat/completions"
    headers = {"x-quotaflow-key": "gw-bad", "Authorization": "Bearer x"}
    sent = len(stub.requests)
    bad_json = httpx.post(url, content=b"{not json", headers=headers)
    assert bad_json.status_code == 400 and "parse the JSON" in bad_json.json()["error"]["message"]
    no_model = httpx.post(url, json={"messages": MESSAGES}, headers=headers)
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    unknown = httpx.post(url, json={"model": "mystery-9", "messages": MESSAGES}, headers=headers)
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "model_not_found"
    huge = httpx.post(url, json={"model": "gpt-4o", "messages": MESSAGES, "pad": "x" * 10000},
                      headers=headers)  # fmt: skip
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    bad_messages = httpx.post(url, json={"model": "gpt-4o", "messages": "hi"}, headers=headers)
    assert bad_messages.status_code == 400
    assert len(stub.requests) == sent, "none of these reached the upstream"
    assert httpx.get(gw.base_url.removesuffix("/v1") + "/healthz").json()["ok"] is True
    flush(gw)
    assert not [r for _, r in usage_records(gw.gateway.settings) if r.key == "gw-bad"]


def test_upstream_down_is_502_and_slow_upstream_is_504(
    make_gateway: GatewayFactory, stub: OpenAIStub
) -> None:
    down = make_gateway(upstream=f"http://127.0.0.1:{free_port()}")
    headers = {"x-quotaflow-key": "gw-down", "Authorization": "Bearer x"}
    payload = {"model": "gpt-4o", "messages": MESSAGES}
    r = httpx.post(down.base_url + "/chat/completions", json=payload, headers=headers)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    assert down.gateway.quota.open_reservations == 0
    slow = make_gateway(upstream_timeout=0.3)
    stub.response_delay = 1.0
    try:
        r = httpx.post(slow.base_url + "/chat/completions", json=payload,
                       headers={**headers, "x-quotaflow-key": "gw-slow"}, timeout=10)  # fmt: skip
    finally:
        stub.response_delay = 0.0
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert slow.gateway.quota.open_reservations == 0
    flush(down)
    flush(slow)
    records = usage_records(slow.gateway.settings)
    # never reached the provider: nothing to count; timed out there: counted once, as an error
    assert not [r for _, r in records if r.key == "gw-down"]
    timed_out = [r for _, r in records if r.key == "gw-slow"]
    assert len(timed_out) == 1
    assert timed_out[0].status == "error" and timed_out[0].estimated
    assert timed_out[0].prompt_tokens > 0 and timed_out[0].completion_tokens == 0


def test_other_routes_pass_and_count_only_where_a_policy_says(
    gateway: GatewayThread, base_settings: QuotaflowSettings
) -> None:
    # 2 requests a minute, and no count_routes: /v1/models passes 4 times, never counted
    free = client(gateway, key="uncounted-team")
    for _ in range(4):
        assert [m.id for m in free.models.list()] == ["gpt-4o"]
    counted = client(gateway, key="routes-team")
    counted.models.list()
    counted.models.list()
    with pytest.raises(openai.RateLimitError):
        counted.models.list()
    flush(gateway)
    keys = [r.key for _, r in usage_records(base_settings)]
    assert "uncounted-team" not in keys
    assert keys.count("routes-team") == 2


def test_concurrent_clients_never_overspend_a_tight_budget(
    gateway: GatewayThread, stub: OpenAIStub, base_settings: QuotaflowSettings
) -> None:
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        c = client(gateway, key="load-team")
        for _ in range(5):
            try:
                c.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=40)
                result = "ok"
            except openai.RateLimitError:
                result = "429"
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 100
    assert outcomes.count("429") > 0 and outcomes.count("ok") > 0
    flush(gateway)
    spent = sum(r.total_tokens for _, r in usage_records(base_settings) if r.key == "load-team")
    assert spent <= 1500, "reservations keep concurrent calls inside the budget"
    assert outcomes.count("ok") == len(
        [1 for _, r in usage_records(base_settings) if r.key == "load-team"]
    )


def test_azure_style_token_headers_when_named(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(
        remaining_tokens_header="x-remaining-tokens", consumed_tokens_header="x-consumed-tokens"
    )
    raw = client(gw, key="gw-azure").chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES
    )
    usage = raw.parse().usage
    assert usage is not None
    assert raw.headers["x-consumed-tokens"] == str(usage.total_tokens)
    remaining = int(raw.headers["x-remaining-tokens"])
    assert remaining == int(raw.headers["x-ratelimit-remaining-tokens"])
    assert remaining == 1_000_000 - usage.total_tokens


def test_generated_requests_never_break_the_gateway(
    make_gateway: GatewayFactory, stub: OpenAIStub
) -> None:
    """Generated request bodies and headers (hypothesis): every answer is a well-formed response
    (an OpenAI-style error for bad input, never a 500), and the gateway stays up."""
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    gw = make_gateway(max_body_bytes=4096)
    base = gw.base_url
    junk = json_junk()
    bodies = st.one_of(
        st.binary(max_size=300),
        junk.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"model": st.one_of(st.text(max_size=20), junk), "messages": junk},
            optional={"max_tokens": junk, "stream": junk, "stream_options": junk},
        ).map(lambda d: json.dumps(d).encode()),
        st.integers(min_value=4097, max_value=20000).map(lambda n: b'{"model":"' + b"x" * n),
    )
    routes = st.sampled_from(["/chat/completions", "/completions", "/embeddings", "/models"])
    header_values = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.:", min_size=1,
                            max_size=40)  # fmt: skip

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies, routes, header_values, st.sampled_from(["POST", "GET", "PUT"]))
    # found in a run: an embeddings body without input (the local upstream answered 500)
    @example(b'{"model":" ","messages":[]}', "/embeddings", "0", "POST")
    def one(body: bytes, route: str, key: str, method: str) -> None:
        headers = {"x-quotaflow-key": f"gw-{key}", "Authorization": f"Bearer {key}"}
        r = httpx.request(method, base + route, content=body, headers=headers, timeout=10)
        assert r.status_code < 500 or r.status_code in (502, 504), (r.status_code, r.text)
        if r.status_code in (400, 401, 413, 429):  # the gateway's own answers (the upstream's
            assert "error" in r.json(), r.text  # 404/405 pass through as it sent them)

    one()
    assert httpx.get(base.removesuffix("/v1") + "/healthz").json()["ok"] is True


# -- a hostile caller ------------------------------------------------------------------------


def test_with_the_defaults_a_caller_cannot_choose_its_counter_key(
    make_gateway: GatewayFactory, stub: OpenAIStub
) -> None:
    """Rotating x-quotaflow-key or OpenAI-Organization buys no fresh budget: with the default
    key sources the key is the caller's credential (3 requests a minute here)."""
    gw = make_gateway(key_sources=list(DEFAULT_KEY_SOURCES))
    served_before = len(stub.reported)
    answers = []
    for i in range(6):
        r = httpx.post(
            gw.base_url + "/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES},
            headers={"Authorization": f"Bearer {TIGHT_SECRET}", "x-quotaflow-key": f"gw-new-{i}",
                     "OpenAI-Organization": f"org-{i}"},
            timeout=10,
        )  # fmt: skip
        answers.append(r.status_code)
    assert answers == [200, 200, 200, 429, 429, 429]
    assert len(stub.reported) - served_before == 3


def test_a_secret_looking_counter_key_is_refused_before_the_upstream(
    gateway: GatewayThread, stub: OpenAIStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    received = len(stub.received)
    for secret in ("sk-proj-abcdef0123456789", "Sk-abcdef0123456789", "BEARER abcdef0123456789",
                   "Bearer\tabcdef0123456789", "rk-live-abcdef0123456789"):  # fmt: skip
        for path in ("/chat/completions", "/models"):
            r = httpx.post(
                gateway.base_url + path,
                json={"model": "gpt-4o", "messages": MESSAGES},
                headers={"x-quotaflow-key": secret, "Authorization": "Bearer x"},
                timeout=10,
            )
            assert r.status_code == 400, (secret, r.text)
            assert r.json()["error"]["code"] == "invalid_counter_key"
            assert secret not in r.text
            assert "abcdef0123456789" not in caplog.text
    assert len(stub.received) == received, "nothing reached the upstream"


def test_nothing_reaches_the_upstream_unless_its_usage_is_recorded(
    gateway: GatewayThread, stub: OpenAIStub, base_settings: QuotaflowSettings
) -> None:
    """Hostile shapes of key, model, output ceiling and route: each call is either refused
    before the upstream (4xx) or served and recorded under its key, never served uncounted."""
    chat = {"model": "gpt-4o", "messages": MESSAGES}
    cases = [
        ("/chat/completions", "gw-" + "k" * 300, chat),  # key over the record's 256 chars
        ("/chat/completions", "gw-inv-model", {**chat, "model": "m" * 200}),
        ("/chat/completions", "gw-inv-ceiling", {**chat, "max_tokens": 10**12}),
        ("/models/" + "x" * 200, "routes-inv", None),  # a counted route, too long to record
        ("/chat/completions", "gw-inv-ok", chat),  # and one that is fine
    ]
    outcomes = {}
    for path, key, body in cases:
        before = len(stub.received)
        method = "POST" if body is not None else "GET"
        headers = {"x-quotaflow-key": key, "Authorization": "Bearer x"}
        r = httpx.request(method, gateway.base_url + path, json=body, headers=headers, timeout=10)
        reached = len(stub.received) > before
        outcomes[key] = (r.status_code, reached)
        assert r.status_code < 500, (key[:40], r.text)
        if not reached:
            assert 400 <= r.status_code < 500, (key[:40], r.status_code)
    flush(gateway)
    recorded = {r.key for _, r in usage_records(base_settings)}
    for key, (status, reached) in outcomes.items():
        assert not reached or key in recorded, f"{key[:40]} served ({status}) but not recorded"
    assert outcomes["gw-inv-ok"] == (200, True)
    assert not any(reached for k, (_, reached) in outcomes.items() if k != "gw-inv-ok")


def test_a_policy_that_rejects_unpriced_models_answers_400_before_the_upstream(
    gateway: GatewayThread, stub: OpenAIStub, base_settings: QuotaflowSettings
) -> None:
    c = client(gateway, key="priced-team")
    before = len(stub.requests)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="house-model-x", messages=MESSAGES)
    assert err.value.code == "model_not_priced"
    assert "has no price" in str(err.value) and "unpriced: reject" in str(err.value)
    assert len(stub.requests) == before, "nothing reached the upstream"
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # a priced model passes
    assert len(stub.requests) == before + 1
    flush(gateway)
    records = [r for _, r in usage_records(base_settings) if r.key == "priced-team"]
    assert [r.model for r in records] == ["gpt-4o"]


def test_the_default_salt_is_refused_beyond_loopback(
    base_settings: QuotaflowSettings, stub: OpenAIStub
) -> None:
    from quotaflow._exceptions import ConfigError
    from quotaflow_producers.gateway.server import Gateway

    settings = base_settings.model_copy(deep=True)
    settings.gateway = GatewaySettings(listen_host="0.0.0.0", upstream=stub.base_url)
    quota = QuotaClient(settings, follow=False)
    with pytest.raises(ConfigError, match="QUOTAFLOW_GATEWAY__KEY_SALT"):
        Gateway(settings, quota)
    settings.gateway = GatewaySettings(listen_host="127.0.0.1", upstream=stub.base_url)
    Gateway(settings, quota)  # loopback: a developer's gateway starts
    settings.gateway = GatewaySettings(listen_host="0.0.0.0", key_salt="a-private-salt")
    Gateway(settings, quota)


def test_streams_are_relayed_chunk_by_chunk_and_a_cancel_settles_what_was_delivered(
    gateway: GatewayThread, stub: OpenAIStub, base_settings: QuotaflowSettings
) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    headers = {"x-quotaflow-key": "gw-relay", "Authorization": "Bearer x"}
    stub.chunk_delay = 0.1  # the upstream takes ~1.4 s to finish its stream
    try:
        finished = stub.streams_finished
        with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body,
                          headers=headers, timeout=10) as resp:  # fmt: skip
            chunks = resp.iter_bytes()
            first = next(chunks)
            # the first chunk is here while the upstream is still writing: nothing buffered
            assert first.startswith(b"data: ") and stub.streams_finished == finished
            got = first + b"".join(chunks)
        assert stub.streams_finished == finished + 1 and got.rstrip().endswith(b"[DONE]")
        # a caller that leaves after two chunks: the call settles with what it was sent
        with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body,
                          headers={**headers, "x-quotaflow-key": "gw-cancel"},
                          timeout=10) as resp:  # fmt: skip
            chunks = resp.iter_bytes()
            delivered = next(chunks)
            while delivered.count(b"data: ") < 2:
                delivered += next(chunks)
        wait_for(lambda: gateway.gateway.quota.open_reservations == 0, what="the cancel settled")
    finally:
        stub.chunk_delay = 0.0
    flush(gateway)
    records = usage_records(base_settings)
    relayed = [r for _, r in records if r.key == "gw-relay"]
    assert len(relayed) == 1 and relayed[0].status == "ok"
    assert relayed[0].completion_tokens == count_text(REPLY, "gpt-4o")
    cancelled = [r for _, r in records if r.key == "gw-cancel"]
    assert len(cancelled) == 1 and cancelled[0].status == "cancelled" and cancelled[0].estimated
    assert 0 < cancelled[0].completion_tokens < count_text(REPLY, "gpt-4o"), cancelled


def test_counter_keys_come_from_the_sources_in_their_order(
    make_gateway: GatewayFactory, base_settings: QuotaflowSettings
) -> None:
    gw = make_gateway(key_sources=["organization", "api_key", "ip"])
    url, body = gw.base_url + "/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}
    # OpenAI-Organization first; then the API key's id; with neither, the caller's address
    for headers in ({"OpenAI-Organization": "org-order", "Authorization": f"Bearer {OTHER_SECRET}"},
                    {"Authorization": f"Bearer {OTHER_SECRET}"}, {}):  # fmt: skip
        assert httpx.post(url, json=body, headers=headers, timeout=10).status_code == 200
    flush(gw)
    salt = base_settings.gateway.key_salt.get_secret_value()
    keys = [r.key for _, r in usage_records(base_settings)]
    assert keys.count("org-order") == 1
    assert keys.count("ip:127.0.0.1") == 1
    assert key_id(OTHER_SECRET, salt) in keys
