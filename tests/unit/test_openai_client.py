"""The official openai client (sync, async, streaming) through quotaflow's metering transport,
against a local OpenAI-compatible server over TCP, with usage kept by the in-memory transport
(no broker: the same integration over the real broker and a worker is in
``tests/e2e/test_reservations.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from quotaflow import QuotaClient
from quotaflow.integrations.openai import instrument, retry_after
from quotaflow.policies import parse_policies
from quotaflow.record import UsageRecord
from quotaflow.tokens import count_request, count_text
from quotaflow.transports import MemoryTransport
from quotaflow_producers.testing import REPLY, OpenAIStub
from tests.support.memory_client import memory_quota, sent_records
from tests.support.prices import genai_cost

POLICIES = parse_policies(
    {
        "policies": [
            {"name": "roomy", "keys": ["oa-*"], "limits": {"tokens_per_minute": 100000}},
            {
                "name": "tight",
                "keys": ["tight-*"],
                "limits": {"tokens_per_minute": 300},
                "default_max_output_tokens": 50,
            },
        ]
    }
)
MESSAGES = [{"role": "user", "content": "Say something short about quotas."}]


@pytest.fixture
def usage() -> MemoryTransport:
    return MemoryTransport(partitions=1)


@pytest.fixture
def quota(usage: MemoryTransport) -> Iterator[QuotaClient]:
    yield from memory_quota(POLICIES, usage, "oa-test")


def records(quota: QuotaClient, usage: MemoryTransport) -> list[UsageRecord]:
    return sent_records(quota, usage)


def expected_usage(model: str = "gpt-4o") -> tuple[int, int]:
    prompt = count_request({"model": model, "messages": MESSAGES}).tokens
    return prompt, count_text(REPLY, model)


def sync_client(stub: OpenAIStub, quota: QuotaClient, key: str = "oa-team") -> openai.OpenAI:
    base = openai.OpenAI(base_url=stub.base_url, api_key="sk-test-not-a-real-key", max_retries=0)
    return instrument(base, quota=quota, key=key)


def test_sync_call_is_recorded_with_the_providers_usage(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = sync_client(stub, quota)
    resp = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100)
    assert resp.choices[0].message.content == REPLY
    (rec,) = records(quota, usage)
    assert (rec.prompt_tokens, rec.completion_tokens) == expected_usage()
    assert rec.key == "oa-team" and not rec.estimated and rec.status == "ok"
    assert quota.open_reservations == 0


def test_stream_with_include_usage_uses_the_final_chunk(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = sync_client(stub, quota)
    stream = client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == REPLY
    (rec,) = records(quota, usage)
    assert (rec.prompt_tokens, rec.completion_tokens) == expected_usage()
    assert not rec.estimated


def test_stream_without_usage_is_counted_locally(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = sync_client(stub, quota)
    with client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) as stream:
        for _ in stream:
            pass
    (rec,) = records(quota, usage)
    assert (rec.prompt_tokens, rec.completion_tokens) == expected_usage()
    assert rec.estimated


def test_cancelled_stream_settles_what_was_delivered(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    stub.chunk_delay = 0.02
    try:
        client = sync_client(stub, quota)
        stream = client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        delivered = ""
        for i, chunk in enumerate(stream):
            delivered += chunk.choices[0].delta.content or ""
            if i == 2:
                break
        stream.close()
    finally:
        stub.chunk_delay = 0.0
    (rec,) = records(quota, usage)
    assert rec.status == "cancelled" and rec.estimated
    full = count_text(REPLY, "gpt-4o")
    assert count_text(delivered, "gpt-4o") <= rec.completion_tokens < full


def test_denied_before_the_http_call_as_the_clients_rate_limit_error(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = sync_client(stub, quota, key="tight-team")
    # 300 tokens a minute: the first call holds ~14 + 280 and settles at ~29 tokens used;
    # the second one's ~294 no longer fits.
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=280)
    sent_before = len(stub.requests)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=280)
    assert len(stub.requests) == sent_before, "a denial never reaches the provider"
    assert err.value.status_code == 429 and err.value.code == "rate_limit_exceeded"
    assert "tokens_per_minute" in err.value.message
    wait = retry_after(err.value)
    assert wait is not None and 0 < wait <= 61  # a minute slides in 1 s buckets
    assert len(records(quota, usage)) == 1, "only the admitted call is recorded"


def test_provider_429_is_recorded_as_an_error_without_tokens(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = sync_client(stub, quota)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="stub-429", messages=MESSAGES)
    (rec,) = records(quota, usage)
    assert rec.status == "error" and rec.total_tokens == 0 and rec.requests == 1


def test_embeddings_and_completions_are_metered_other_routes_pass(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = sync_client(stub, quota)
    client.embeddings.create(model="text-embedding-3-small", input=["hello world", "quota"])
    client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hello world", max_tokens=20)
    assert [m.id for m in client.models.list()] == ["gpt-4o"]
    emb, cmp_ = records(quota, usage)
    assert (emb.prompt_tokens, emb.completion_tokens, emb.estimated) == (3, 0, False)
    assert cmp_.prompt_tokens == 2 and cmp_.completion_tokens == count_text(REPLY, "gpt-4o")


def test_async_client_plain_and_streaming(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    async def run() -> str:
        base = openai.AsyncOpenAI(base_url=stub.base_url, api_key="sk-test-x", max_retries=0)
        client = instrument(base, quota=quota, key=lambda body: f"oa-{body['model']}")
        plain = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return (plain.choices[0].message.content or "") + "|" + text

    assert asyncio.run(run()) == REPLY + "|" + REPLY
    first, second = records(quota, usage)
    assert first.key == "oa-gpt-4o" and second.key == "oa-gpt-4o-mini"
    assert (second.prompt_tokens, second.completion_tokens) == expected_usage("gpt-4o-mini")
    assert not first.estimated and not second.estimated


@pytest.mark.parametrize("stream", [False, True])
def test_cached_and_reasoning_tokens_reach_the_record_and_its_cost(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport, stream: bool
) -> None:
    """The upstream reports OpenAI's usage details; the v2 record carries each unit and the
    cost genai-prices gives for exactly that usage."""
    stub.cached_tokens, stub.reasoning_tokens = 8, 40
    try:
        client = sync_client(stub, quota)
        if stream:
            with client.chat.completions.create(
                model="o3-mini", messages=MESSAGES, stream=True,
                stream_options={"include_usage": True},
            ) as chunks:  # fmt: skip
                list(chunks)
        else:
            client.chat.completions.create(model="o3-mini", messages=MESSAGES)
    finally:
        stub.cached_tokens = stub.reasoning_tokens = 0
    reported = stub.reported[-1]
    [record] = records(quota, usage)
    assert record.prompt_tokens == reported["prompt_tokens"]
    assert record.completion_tokens == reported["completion_tokens"]
    assert record.cached_prompt_tokens == 8 and record.reasoning_tokens == 40
    assert not record.estimated
    assert record.cost_micros == genai_cost(
        "o3-mini", record.prompt_tokens, record.completion_tokens, cached=8, reasoning=40,
        provider="openai",
    )  # fmt: skip
    assert record.cost_micros and record.price_version == quota.prices.version
