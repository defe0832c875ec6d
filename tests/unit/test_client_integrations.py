"""The official clients' newer APIs through quotaflow's metering transport: openai's
``responses.create`` and ``images.generate``/``images.edit``, and the anthropic client's
``messages.create`` and ``messages.stream`` (sync and async), against a local provider-like
server over TCP, usage kept by the in-memory transport. (Over the real broker:
tests/integration/test_gateway_apis.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from quotaflow import QuotaClient
from quotaflow.billed import billed_usage
from quotaflow.integrations import anthropic as qf_anthropic
from quotaflow.integrations import openai as qf_openai
from quotaflow.policies import parse_policies
from quotaflow.record import UsageRecord
from quotaflow.tokens import count_text
from quotaflow.transports import MemoryTransport
from quotaflow_producers.testing import REPLY, OpenAIStub
from tests.support.memory_client import memory_quota, sent_records

POLICIES = parse_policies({"policies": [
    {"name": "roomy", "keys": ["in-*"], "limits": {"tokens_per_minute": 1_000_000}},
    {"name": "tight", "keys": ["tight-*"], "limits": {"requests_per_minute": 1}},
    {"name": "ipm", "keys": ["ipm-*"], "limits": {"images_per_minute": 2}},
    {"name": "budget", "keys": ["budget-*"], "limits": {"cost_per_day": 0.000001}},
]})  # fmt: skip
MESSAGES: Any = [{"role": "user", "content": "Say something short about quotas."}]


@pytest.fixture
def usage() -> MemoryTransport:
    return MemoryTransport(partitions=1)


@pytest.fixture
def quota(usage: MemoryTransport) -> Iterator[QuotaClient]:
    yield from memory_quota(POLICIES, usage, "int-test")


def records(quota: QuotaClient, usage: MemoryTransport) -> list[UsageRecord]:
    return sent_records(quota, usage)


def counted(record: UsageRecord) -> tuple[int, ...]:
    return (record.prompt_tokens, record.completion_tokens, record.cached_prompt_tokens,
            record.cache_write_tokens, record.reasoning_tokens)  # fmt: skip


def oai(stub: OpenAIStub, quota: QuotaClient, key: str = "in-team") -> openai.OpenAI:
    base = openai.OpenAI(base_url=stub.base_url, api_key="sk-test", max_retries=0)
    return qf_openai.instrument(base, quota=quota, key=key)


def claude(stub: OpenAIStub, quota: QuotaClient, key: str = "in-team") -> anthropic.Anthropic:
    base = anthropic.Anthropic(base_url=f"http://127.0.0.1:{stub.port}", api_key="sk-ant-test",
                               max_retries=2)  # fmt: skip
    return qf_anthropic.instrument(base, quota=quota, key=key)


def test_responses_plain_streamed_and_async_record_the_reported_usage(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = oai(stub, quota)
    stub.cached_tokens, stub.reasoning_tokens = 3, 5
    first = len(stub.reported)
    try:
        assert client.responses.create(model="gpt-4o", input="hi").output_text == REPLY
        events = client.responses.create(model="gpt-4o", input="hi", stream=True)
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY

        async def run_async() -> None:
            base = openai.AsyncOpenAI(base_url=stub.base_url, api_key="sk-test", max_retries=0)
            aclient = qf_openai.instrument(base, quota=quota, key="in-team")
            async with await aclient.responses.create(model="gpt-4o", input="hi",
                                                      stream=True) as stream:  # fmt: skip
                async for _ in stream:
                    pass

        asyncio.run(run_async())
    finally:
        stub.cached_tokens = stub.reasoning_tokens = 0
    reported = stub.reported[first:]
    recs = records(quota, usage)
    assert [counted(r) for r in recs] == [tuple(billed_usage(u) or ()) for u in reported]
    assert all(r.reasoning_tokens == 5 and r.cached_prompt_tokens == 3 for r in recs)
    assert all(not r.estimated and r.attrs["operation"] == "chat" for r in recs)


def test_images_generate_and_edit_record_images_and_limit_them_per_minute(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = oai(stub, quota, key="ipm-team")
    client.images.generate(model="dall-e-3", prompt="a kite", n=1)
    edited = client.images.edit(model="gpt-image-1", image=("a.png", b"\x89PNG", "image/png"),
                                prompt="add wind")  # fmt: skip
    assert edited.usage is not None
    served = len(stub.reported)
    with pytest.raises(openai.RateLimitError) as denied:
        client.images.generate(model="dall-e-3", prompt="more", n=1)  # 3 > 2 a minute
    assert len(stub.reported) == served, "denied before the HTTP call"
    assert qf_openai.retry_after(denied.value) is not None
    dalle, edit = records(quota, usage)
    assert (dalle.images, dalle.prompt_tokens, dalle.cost_micros) == (1, 0, 40_000)
    assert edit.images == 1 and edit.prompt_tokens == stub.reported[-1]["input_tokens"]


def test_anthropic_create_stream_and_async_record_anthropics_usage(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = claude(stub, quota)
    stub.cached_tokens, stub.cache_write_tokens = 6, 4
    first = len(stub.reported)
    try:
        msg = client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MESSAGES)
        assert msg.content[0].text == REPLY  # type: ignore[union-attr]
        with client.messages.stream(model="claude-haiku-4-5", max_tokens=50,
                                    messages=MESSAGES) as stream:  # fmt: skip
            assert "".join(stream.text_stream) == REPLY

        async def run_async() -> str:
            base = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{stub.port}",
                                            api_key="sk-ant-test", max_retries=0)  # fmt: skip
            aclient = qf_anthropic.instrument(base, quota=quota, key="in-team")
            answer = await aclient.messages.create(model="claude-haiku-4-5", max_tokens=50,
                                                   messages=MESSAGES)  # fmt: skip
            return answer.content[0].text  # type: ignore[union-attr]

        assert asyncio.run(run_async()) == REPLY
    finally:
        stub.cached_tokens = stub.cache_write_tokens = 0
    reported = stub.reported[first:]
    recs = records(quota, usage)
    assert [counted(r) for r in recs] == [
        tuple(billed_usage(u, "anthropic") or ()) for u in reported
    ]
    # Anthropic's input_tokens exclude the cache parts, which the record adds in
    for r, u in zip(recs, reported, strict=True):
        parts = u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]
        assert parts > 0 and r.prompt_tokens == u["input_tokens"] + parts
    assert all(r.provider == "anthropic" and not r.estimated for r in recs)


def test_anthropic_denial_is_its_own_rate_limit_error_before_any_http_call(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = claude(stub, quota, key="tight-claude")  # the client would retry 429s twice
    client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=MESSAGES)
    served = len(stub.requests)
    with pytest.raises(anthropic.RateLimitError) as denied:
        client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=MESSAGES)
    assert len(stub.requests) == served, "never sent, and not retried"
    body = denied.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert qf_anthropic.retry_after(denied.value) is not None
    wait = float(denied.value.response.headers["retry-after"])
    assert 1 <= wait <= 61
    with pytest.raises(anthropic.RateLimitError) as spent:
        claude(stub, quota, key="budget-claude").messages.create(
            model="claude-sonnet-4-5", max_tokens=5, messages=MESSAGES
        )
    assert "budget" in spent.value.response.json()["error"]["message"]


def test_a_cancelled_anthropic_stream_settles_what_was_delivered(
    stub: OpenAIStub, quota: QuotaClient, usage: MemoryTransport
) -> None:
    client = claude(stub, quota)
    stub.chunk_delay = 0.02
    try:
        with client.messages.stream(model="claude-haiku-4-5", max_tokens=50,
                                    messages=MESSAGES) as stream:  # fmt: skip
            for i, _ in enumerate(stream.text_stream):
                if i == 2:
                    break
    finally:
        stub.chunk_delay = 0.0
    (rec,) = records(quota, usage)
    assert rec.status == "cancelled" and rec.estimated
    assert rec.prompt_tokens == stub.reported[-1]["input_tokens"]
    assert 0 < rec.completion_tokens < count_text(REPLY, "claude-haiku-4-5")
