"""The gateway's newer routes with the real clients: OpenAI's Responses and images with the
``openai`` package, Anthropic's Messages with the ``anthropic`` package, against local
provider-like upstreams (one per provider: routes go to theirs), usage to the real broker.
For each, the usage record equals what the upstream reported, denials come before the upstream
sees the call, and a malformed body gets that API's own error shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import anthropic
import httpx
import openai
import pytest

from quotaflow import key_id
from quotaflow.billed import billed_usage
from quotaflow.record import UsageRecord
from quotaflow.settings import QuotaflowSettings
from quotaflow.tokens import count_request, count_text
from quotaflow_producers.gateway.runner import GatewayThread
from quotaflow_producers.testing import REPLY, OpenAIStub
from quotaflow_stream.topics import ensure_topics
from tests.support import wait_for
from tests.support.fuzzing import json_junk
from tests.support.gateways import GatewayFactory, flush, gateway_factory, usage_records

pytestmark = pytest.mark.integration

PIPELINE_POLICIES = """
version: 1
policies:
  - {name: roomy, keys: ["api-*", "k_*"], max_staleness: 600,
     limits: {requests_per_minute: 100000, tokens_per_minute: 1000000}}
  - {name: tight, keys: ["tight-*"], max_staleness: 600, limits: {requests_per_minute: 1}}
  - {name: ipm, keys: ["ipm-*"], max_staleness: 600, limits: {images_per_minute: 3}}
  - {name: counted, keys: ["count-*"], max_staleness: 600, limits: {tokens_per_minute: 600}}
"""
OFFSET = 1000
INSTRUCTIONS = "Answer in one sentence."
QUESTION = "What does a gateway meter?"
ANTHROPIC_SECRET = "sk-ant-caller-0123456789abcdef"


@pytest.fixture(scope="module")
def anthropic_stub() -> Iterator[OpenAIStub]:
    """Anthropic's API on an upstream of its own: the gateway routes /v1/messages there."""
    s = OpenAIStub().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def make_gateway(
    settings: QuotaflowSettings, stub: OpenAIStub, anthropic_stub: OpenAIStub
) -> Iterator[GatewayFactory]:
    ensure_topics(settings)
    factory = gateway_factory(settings, f"http://127.0.0.1:{stub.port}")
    make = next(factory)

    def routed(**gateway: Any) -> GatewayThread:
        upstreams = {"/v1/messages": f"http://127.0.0.1:{anthropic_stub.port}"}
        return make(**{"upstreams": upstreams, **gateway})

    yield routed
    next(factory, None)


@pytest.fixture(scope="module")
def gateway(make_gateway: GatewayFactory) -> GatewayThread:
    return make_gateway()


def oai(gw: GatewayThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0,
                         default_headers={"x-quotaflow-key": key})  # fmt: skip


def claude(gw: GatewayThread, key: str | None = None) -> anthropic.Anthropic:
    headers = {"x-quotaflow-key": key} if key else None
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{gw.port}", api_key=ANTHROPIC_SECRET,
                               max_retries=0, default_headers=headers)  # fmt: skip


def records_of(gw: GatewayThread, key: str) -> list[UsageRecord]:
    flush(gw)
    return [r for _, r in usage_records(gw.gateway.settings) if r.key == key]


def as_counted(record: UsageRecord) -> tuple[int, int, int, int, int]:
    return (record.prompt_tokens, record.completion_tokens, record.cached_prompt_tokens,
            record.cache_write_tokens, record.reasoning_tokens)  # fmt: skip


def billed(usage: dict[str, Any], provider: str | None = None) -> tuple[int, ...]:
    b = billed_usage(usage, provider)
    assert b is not None
    return tuple(b)


def cancel_midway(
    gw: GatewayThread, upstream: OpenAIStub, route: str, body: dict[str, Any], key: str,
    event: bytes,
) -> None:  # fmt: skip
    """Stream ``body`` through the gateway and leave after four ``event`` events; wait until
    the gateway has settled the call."""
    upstream.chunk_delay = 0.1
    try:
        with httpx.stream("POST", gw.base_url + route, json={**body, "stream": True},
                          headers={"x-quotaflow-key": key}, timeout=10) as resp:  # fmt: skip
            chunks = resp.iter_bytes()
            delivered = next(chunks)
            while delivered.count(event) < 4:
                delivered += next(chunks)
        wait_for(lambda: gw.gateway.quota.open_reservations == 0, what="the cancel settled")
    finally:
        upstream.chunk_delay = 0.0


# -- OpenAI Responses ------------------------------------------------------------------------


def test_responses_plain_and_streamed_record_the_reported_usage(
    gateway: GatewayThread, stub: OpenAIStub
) -> None:
    c = oai(gateway, "api-responses")
    stub.usage_offset, stub.cached_tokens, stub.reasoning_tokens = OFFSET, 5, 7
    try:
        first = len(stub.reported)
        plain = c.responses.create(model="gpt-4o", instructions=INSTRUCTIONS, input=QUESTION)
        assert plain.output_text == REPLY
        items = [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
        streamed = c.responses.create(model="gpt-4o", input=items, stream=True)
        text = "".join(e.delta for e in streamed if e.type == "response.output_text.delta")
        assert text == REPLY
    finally:
        stub.usage_offset = stub.cached_tokens = stub.reasoning_tokens = 0
    reported = stub.reported[first:]
    records = records_of(gateway, "api-responses")
    assert len(records) == 2, "one record per call"
    assert sorted(as_counted(r) for r in records) == sorted(billed(u) for u in reported)
    assert all(not r.estimated and r.status == "ok" for r in records)
    assert all(r.cached_prompt_tokens == 5 and r.reasoning_tokens == 7 for r in records)
    assert {r.attrs["operation"] for r in records} == {"chat"}


def test_the_responses_prompt_estimate_covers_instructions_input_and_tools() -> None:
    base = {"model": "gpt-4o", "input": QUESTION}
    plain = count_request(base, kind="responses").tokens
    with_instructions = count_request({**base, "instructions": INSTRUCTIONS}, kind="responses")
    assert with_instructions.tokens > plain and not with_instructions.estimated
    params = {"type": "object", "properties": {"word": {"type": "string"}}}
    tool = {"type": "function", "name": "lookup", "description": "Look a word up",
            "parameters": params}  # fmt: skip
    assert count_request({**base, "tools": [tool]}, kind="responses").tokens > plain
    items = [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
    assert count_request({"model": "gpt-4o", "input": items}, kind="responses").tokens >= plain
    with pytest.raises(ValueError, match="input"):
        count_request({"model": "gpt-4o", "input": 7}, kind="responses")


def test_a_cancelled_responses_stream_settles_what_was_delivered(
    gateway: GatewayThread, stub: OpenAIStub
) -> None:
    body = {"model": "gpt-4o", "input": QUESTION}
    cancel_midway(gateway, stub, "/responses", body, "api-resp-cancel", b"output_text.delta")
    (record,) = records_of(gateway, "api-resp-cancel")
    assert record.status == "cancelled" and record.estimated
    assert 0 < record.completion_tokens < count_text(REPLY, "gpt-4o")


# -- OpenAI images ---------------------------------------------------------------------------


def test_image_generations_and_edits_count_images_and_tokens(
    gateway: GatewayThread, stub: OpenAIStub
) -> None:
    c = oai(gateway, "api-images")
    first = len(stub.reported)
    made = c.images.generate(model="dall-e-3", prompt="a lighthouse at dusk", n=2,
                             size="1792x1024", quality="hd")  # fmt: skip
    assert len(made.data or []) == 2
    tokens = c.images.generate(model="gpt-image-1", prompt="a lighthouse at dusk")
    assert tokens.usage is not None
    edited = c.images.edit(model="gpt-image-1", image=("in.png", b"\x89PNG fake", "image/png"),
                           prompt="add a boat", n=2)  # fmt: skip
    assert len(edited.data or []) == 2
    reported = stub.reported[first:]
    records = records_of(gateway, "api-images")
    assert len(records) == 3
    by_images = sorted(records, key=lambda r: (r.model, r.images))
    dalle, gpt_one, gpt_edit = by_images[0], by_images[1], by_images[2]
    assert (dalle.model, dalle.images, dalle.prompt_tokens) == ("dall-e-3", 2, 0)
    # dall-e-3 at config/prices.yaml's per-image price for its quality and size
    assert dalle.cost_micros == 2 * 120_000 and dalle.priced_as == "dall-e-3/hd/1792x1024"
    assert dalle.attrs["image_size"] == "1792x1024" and dalle.attrs["image_quality"] == "hd"
    assert gpt_one.images == 1 and gpt_edit.images == 2
    for record, usage in ((gpt_one, reported[1]), (gpt_edit, reported[2])):
        assert record.prompt_tokens == usage["input_tokens"]
        assert record.completion_tokens == usage["output_tokens"]
        assert not record.estimated
    assert {r.attrs["operation"] for r in records} == {"generate_content"}


def test_images_per_minute_is_enforced_before_the_upstream(
    gateway: GatewayThread, stub: OpenAIStub
) -> None:
    c = oai(gateway, "ipm-team")
    c.images.generate(model="dall-e-3", prompt="one", n=2)
    served = len(stub.reported)
    with pytest.raises(openai.RateLimitError) as denied:
        c.images.generate(model="dall-e-3", prompt="two", n=2)  # 4 > 3 a minute
    assert len(stub.reported) == served, "the upstream never saw the denied call"
    assert denied.value.response.json()["error"]["code"] == "rate_limit_exceeded"
    assert "images_per_minute" in denied.value.response.json()["error"]["message"]


# -- Anthropic Messages ----------------------------------------------------------------------


def test_messages_plain_and_streamed_with_cache_tokens_and_anthropic_headers(
    gateway: GatewayThread, stub: OpenAIStub, anthropic_stub: OpenAIStub
) -> None:
    c = claude(gateway, "api-claude")
    anthropic_stub.usage_offset = OFFSET
    anthropic_stub.cached_tokens, anthropic_stub.cache_write_tokens = 300, 200
    openai_served, first = len(stub.reported), len(anthropic_stub.reported)
    messages: Any = [{"role": "user", "content": QUESTION}]
    try:
        raw = c.messages.with_raw_response.create(
            model="claude-sonnet-4-5", max_tokens=100, system=INSTRUCTIONS, messages=messages
        )
        assert raw.parse().content[0].text == REPLY  # type: ignore[union-attr]
        with c.messages.stream(model="claude-sonnet-4-5", max_tokens=100,
                               messages=messages) as stream:  # fmt: skip
            assert "".join(stream.text_stream) == REPLY
        created = c.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=messages,
                                    stream=True)  # fmt: skip
        events = [e.type for e in created]
        assert events[0] == "message_start" and events[-1] == "message_stop"
    finally:
        anthropic_stub.usage_offset = anthropic_stub.cached_tokens = 0
        anthropic_stub.cache_write_tokens = 0
    assert len(stub.reported) == openai_served, "Anthropic's routes go to Anthropic's upstream"
    for family in ("requests", "tokens"):
        assert raw.headers[f"anthropic-ratelimit-{family}-limit"].isdigit()
        assert raw.headers[f"anthropic-ratelimit-{family}-remaining"].isdigit()
        reset = raw.headers[f"anthropic-ratelimit-{family}-reset"]
        assert datetime.fromisoformat(reset.replace("Z", "+00:00")).tzinfo is not None
    assert not any(h.startswith("x-ratelimit-") for h in raw.headers)
    reported = anthropic_stub.reported[first:]
    records = records_of(gateway, "api-claude")
    assert len(records) == 3
    # Anthropic's input_tokens exclude cache reads and writes: the record adds them in
    assert sorted(as_counted(r) for r in records) == sorted(
        billed(u, "anthropic") for u in reported
    )
    for record, usage in zip(sorted(records, key=as_counted), sorted(reported,
                             key=lambda u: billed(u, "anthropic")), strict=True):  # fmt: skip
        total_in = usage["input_tokens"] + 300 + 200
        assert record.prompt_tokens == total_in and record.cached_prompt_tokens == 300
        assert record.cache_write_tokens == 200 and record.provider == "anthropic"
        assert not record.estimated and record.cost_micros and record.cost_micros > 0


def test_the_anthropic_key_comes_from_x_api_key_as_an_hmac_id(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(key_sources=["api_key"])
    claude(gw).messages.create(model="claude-haiku-4-5", max_tokens=10,
                               messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    expected = key_id(ANTHROPIC_SECRET, gw.gateway.settings.gateway.key_salt.get_secret_value())
    flush(gw)
    raw_and_records = [(raw, r) for raw, r in usage_records(gw.gateway.settings)]
    assert [r for _, r in raw_and_records if r.key == expected]
    assert not [raw for raw, _ in raw_and_records if ANTHROPIC_SECRET.encode() in raw]


def test_over_the_limit_is_an_anthropic_shaped_429_before_the_upstream(
    gateway: GatewayThread, anthropic_stub: OpenAIStub
) -> None:
    c = claude(gateway, "tight-claude")
    messages: Any = [{"role": "user", "content": QUESTION}]
    c.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=messages)
    served = len(anthropic_stub.reported)
    with pytest.raises(anthropic.RateLimitError) as denied:
        c.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=messages)
    assert len(anthropic_stub.reported) == served
    response = denied.value.response
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "requests_per_minute" in body["error"]["message"]
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"


def test_a_cancelled_messages_stream_settles_the_reported_input_and_delivered_output(
    gateway: GatewayThread, anthropic_stub: OpenAIStub
) -> None:
    body = {"model": "claude-haiku-4-5", "max_tokens": 100,
            "messages": [{"role": "user", "content": QUESTION}]}  # fmt: skip
    anthropic_stub.cached_tokens = 4
    try:
        cancel_midway(gateway, anthropic_stub, "/messages", body, "api-claude-cancel",
                      b"content_block_delta")  # fmt: skip
    finally:
        anthropic_stub.cached_tokens = 0
    start = anthropic_stub.reported[-1]
    (record,) = records_of(gateway, "api-claude-cancel")
    assert record.status == "cancelled" and record.estimated
    # the input side was reported at message_start: kept, cache reads included
    assert record.prompt_tokens == start["input_tokens"] + 4 and record.cached_prompt_tokens == 4
    assert 0 < record.completion_tokens < count_text(REPLY, "claude-haiku-4-5")


def test_count_tokens_passes_through_and_can_set_the_admission_estimate(
    make_gateway: GatewayFactory, anthropic_stub: OpenAIStub
) -> None:
    body = {"model": "claude-haiku-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": QUESTION}]}  # fmt: skip
    headers = {"x-quotaflow-key": "count-pass", "x-api-key": "sk-x"}
    local = make_gateway()
    r = httpx.post(local.base_url + "/messages/count_tokens", json=body, headers=headers)
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    # the local estimate fits the 600-token minute; Anthropic's own count (the stub adds 1000)
    # does not: with anthropic_count_tokens the gateway admits by Anthropic's count
    anthropic_stub.usage_offset = OFFSET
    try:
        fits = httpx.post(local.base_url + "/messages", json=body,
                          headers={**headers, "x-quotaflow-key": "count-local"})  # fmt: skip
        assert fits.status_code == 200
        counted = make_gateway(anthropic_count_tokens=True)
        asked = len(anthropic_stub.received_counts)
        refused = httpx.post(counted.base_url + "/messages", json=body,
                             headers={**headers, "x-quotaflow-key": "count-remote"})  # fmt: skip
    finally:
        anthropic_stub.usage_offset = 0
    assert len(anthropic_stub.received_counts) == asked + 1
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "shape"),
    [
        ("/responses", b"{not json", "openai"),
        ("/responses", b'{"input": "hi"}', "openai"),
        ("/responses", b'{"model": "gpt-4o", "input": 7}', "openai"),
        ("/images/generations", b'{"model": "dall-e-3", "prompt": "x", "n": 0}', "openai"),
        ("/images/generations", b'{"model": "dall-e-3", "prompt": 5}', "openai"),
        ("/images/edits", b'{"model": "gpt-image-1"}', "openai"),  # not multipart
        ("/messages", b"[1, 2]", "anthropic"),
        ("/messages", b'{"model": "claude-haiku-4-5", "messages": []}', "anthropic"),
        ("/messages", b'{"max_tokens": 5, "messages": []}', "anthropic"),
        ("/messages", b'{"model": "c", "max_tokens": 5, "messages": [3]}', "anthropic"),
    ],
)
def test_a_malformed_body_gets_that_apis_own_error_and_nothing_recorded(
    gateway: GatewayThread, stub: OpenAIStub, anthropic_stub: OpenAIStub, route: str,
    body: bytes, shape: str,
) -> None:  # fmt: skip
    served = len(stub.requests) + len(anthropic_stub.requests)
    key = f"api-bad-{abs(hash((route, body))) % 10**8}"
    headers = {"x-quotaflow-key": key, "Content-Type": "application/json"}
    r = httpx.post(gateway.base_url + route, content=body, headers=headers)
    assert r.status_code == 400, r.text
    answer = r.json()
    if shape == "anthropic":
        assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    else:
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert len(stub.requests) + len(anthropic_stub.requests) == served
    assert not records_of(gateway, key)


def test_generated_requests_to_the_new_routes_never_break_the_gateway(
    make_gateway: GatewayFactory,
) -> None:
    """Generated bodies (hypothesis) to every new route: never a 500, each error in its
    route's shape, no call recorded twice, and the gateway stays up."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    gw = make_gateway(max_body_bytes=4096)
    junk = json_junk()
    bodies = st.one_of(
        st.binary(max_size=200),
        junk.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"model": st.one_of(st.sampled_from(["gpt-4o", "claude-haiku-4-5", "dall-e-3"]),
                                junk)},
            optional={"input": junk, "instructions": junk, "messages": junk, "max_tokens": junk,
                      "prompt": junk, "n": junk, "stream": junk, "system": junk, "tools": junk},
        ).map(lambda d: json.dumps(d).encode()),
    )  # fmt: skip
    routes = st.sampled_from(
        ["/responses", "/images/generations", "/images/edits", "/messages",
         "/messages/count_tokens"]
    )  # fmt: skip
    ids: list[str] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies, routes)
    def one(body: bytes, route: str) -> None:
        key = f"api-fuzz-{len(ids)}"
        ids.append(key)
        r = httpx.post(
            gw.base_url + route,
            content=body,
            timeout=10,
            headers={"x-quotaflow-key": key, "Content-Type": "application/json"},
        )
        assert r.status_code < 500, (r.status_code, r.text)
        if r.status_code >= 400 and r.headers.get("content-type", "").startswith(
            "application/json"
        ):
            answer = r.json()
            if route.startswith("/messages"):
                assert answer["type"] == "error" and "type" in answer["error"], answer
            else:
                assert "error" in answer, answer

    one()
    assert httpx.get(f"http://127.0.0.1:{gw.port}/healthz").json()["ok"] is True
    flush(gw)
    recorded = [r.key for _, r in usage_records(gw.gateway.settings) if r.key in set(ids)]
    assert len(recorded) == len(set(recorded)), "no call recorded twice"
