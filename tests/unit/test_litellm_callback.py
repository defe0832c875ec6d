"""The LiteLLM callback with the real ``litellm`` package: ``acompletion``, the Router (async and
sync) and plain ``completion`` against a local provider-like server over TCP, usage kept by the
in-memory transport. (Two LiteLLM processes sharing one budget through the real pipeline:
tests/e2e/test_litellm_fleet.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import litellm
import pytest

from quotaflow.integrations.litellm import QuotaflowCallback, default_key
from quotaflow.policies import parse_policies
from quotaflow.record import UsageRecord
from quotaflow.transports import MemoryTransport
from quotaflow_producers.testing import OpenAIStub
from tests.support import wait_for
from tests.support.memory_client import memory_quota, sent_records

POLICIES = parse_policies({"policies": [
    {"name": "roomy", "keys": ["ll-*"], "limits": {"tokens_per_minute": 1_000_000}},
    {"name": "tight", "keys": ["tight-*"], "limits": {"requests_per_minute": 1}},
]})  # fmt: skip
MESSAGES = [{"role": "user", "content": "Say something short about quotas."}]


@pytest.fixture(scope="module")
def usage() -> MemoryTransport:
    return MemoryTransport(partitions=1)


@pytest.fixture(scope="module")
def callback(usage: MemoryTransport) -> Iterator[QuotaflowCallback]:
    """One callback for the module: LiteLLM keeps the callbacks it has seen in lists of its
    own, so the callback outlives any one test; each test uses keys of its own."""
    for quota in memory_quota(POLICIES, usage, "ll-test"):
        cb = QuotaflowCallback(quota)
        litellm.callbacks = [cb]
        yield cb
        litellm.logging_callback_manager._reset_all_callbacks()


def records(cb: QuotaflowCallback, usage: MemoryTransport, key: str, n: int) -> list[UsageRecord]:
    """The key's records once ``n`` are there (LiteLLM runs success callbacks in the
    background), and after a moment no more than ``n``."""

    def mine() -> list[UsageRecord]:
        return [r for r in sent_records(cb.quota, usage) if r.key == key]

    wait_for(lambda: len(mine()) >= n or None, timeout=10, what=f"{n} records of {key}")
    time.sleep(0.3)  # a second report of the same call would come now
    got = mine()
    assert len(got) == n, got
    return got


async def settled(cb: QuotaflowCallback) -> None:
    """Keep the event loop running until LiteLLM's logging tasks (they run on it) have settled
    every call: a service's loop runs on; a test's ends when its calls do."""
    for _ in range(200):
        if cb.quota.open_reservations == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("LiteLLM never reported the calls' outcome")


def params(stub: OpenAIStub, key: str, **extra: Any) -> dict[str, Any]:
    return {"model": "openai/gpt-4o", "messages": MESSAGES, "api_base": stub.base_url,
            "api_key": "sk-test", "metadata": {"quotaflow_key": key}, **extra}  # fmt: skip


def test_acompletion_plain_and_streamed_record_the_reported_usage_once(
    stub: OpenAIStub, callback: QuotaflowCallback, usage: MemoryTransport
) -> None:
    first = len(stub.reported)

    async def calls() -> None:
        await litellm.acompletion(**params(stub, "ll-team", max_tokens=50))
        stream = await litellm.acompletion(
            **params(stub, "ll-team", stream=True, stream_options={"include_usage": True})
        )
        async for _ in stream:
            pass
        await settled(callback)

    asyncio.run(calls())
    reported = stub.reported[first:]
    recs = records(callback, usage, "ll-team", 2)
    assert sorted((r.prompt_tokens, r.completion_tokens) for r in recs) == sorted(
        (u["prompt_tokens"], u["completion_tokens"]) for u in reported
    )
    for r in recs:
        assert r.key == "ll-team" and r.model == "gpt-4o" and r.provider == "openai"
        assert r.status == "ok" and r.cost_micros and r.cost_micros > 0
    assert callback.quota.open_reservations == 0


def test_a_denial_is_litellms_rate_limit_error_before_the_upstream(
    stub: OpenAIStub, callback: QuotaflowCallback, usage: MemoryTransport
) -> None:
    router = litellm.Router(model_list=[{"model_name": "gpt-4o", "litellm_params": {
        "model": "openai/gpt-4o", "api_base": stub.base_url, "api_key": "sk-test"}}],
        num_retries=0)  # fmt: skip

    async def calls() -> None:
        await router.acompletion(model="gpt-4o", messages=MESSAGES,
                                 metadata={"quotaflow_key": "tight-router"})  # fmt: skip
        served = len(stub.requests)
        with pytest.raises(litellm.RateLimitError, match="requests_per_minute"):
            await router.acompletion(model="gpt-4o", messages=MESSAGES,
                                     metadata={"quotaflow_key": "tight-router"})  # fmt: skip
        assert len(stub.requests) == served, "the Router never sent the denied call"
        with pytest.raises(litellm.RateLimitError):
            await litellm.acompletion(**params(stub, "tight-router"))
        assert len(stub.requests) == served
        await settled(callback)

    asyncio.run(calls())
    (rec,) = records(
        callback, usage, "tight-router", 1
    )  # the admitted call only: denials are never recorded
    assert rec.key == "tight-router" and rec.status == "ok"


def test_sync_calls_and_failures_are_recorded_once(
    stub: OpenAIStub, callback: QuotaflowCallback, usage: MemoryTransport
) -> None:
    litellm.completion(**params(stub, "ll-sync"))
    with pytest.raises(litellm.RateLimitError):  # the provider's own 429
        litellm.completion(**params(stub, "ll-sync", model="openai/stub-429", num_retries=0))
    recs = sorted(records(callback, usage, "ll-sync", 2), key=lambda r: r.status)
    failed, ok = recs
    assert (failed.status, failed.requests, failed.prompt_tokens) == ("error", 1, 0)
    assert ok.status == "ok" and ok.prompt_tokens == stub.reported[-1]["prompt_tokens"]
    assert ok.id != failed.id


def test_the_counter_key_never_takes_a_secret() -> None:
    assert default_key({"metadata": {"quotaflow_key": "team-a"}}) == "team-a"
    proxy = {"litellm_metadata": {"user_api_key_hash": "ab12", "user_api_key_team_id": "t-1"}}
    assert default_key(proxy) == "t-1"
    assert default_key({"litellm_metadata": {"user_api_key_hash": "ab12"}}) == "ab12"
    assert default_key({"user": "end-user-7", "api_key": "sk-secret"}) == "end-user-7"
    assert default_key({"api_key": "sk-secret"}) == "litellm"
