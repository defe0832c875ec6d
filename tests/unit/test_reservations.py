"""Reservations and streamed usage, on an in-memory transport and an injected clock."""

from __future__ import annotations

import pytest

from quotaflow import QuotaClient, QuotaExceeded, load_settings
from quotaflow.policies import parse_policies
from quotaflow.streaming import StreamUsage
from quotaflow.tokens import count_text
from quotaflow.transports import MemoryTransport

T0 = 1_700_000_040.0 + 5


class Clock:
    now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def transport() -> MemoryTransport:
    return MemoryTransport(partitions=2)


@pytest.fixture
def client(clock: Clock, transport: MemoryTransport) -> QuotaClient:
    policies = parse_policies(
        {
            "policies": [
                {
                    "name": "p",
                    "keys": ["k*"],
                    "limits": {"tokens_per_minute": 3000},
                    "default_max_output_tokens": 500,
                }
            ]
        }
    )
    settings = load_settings(client={"source": "unit", "reservation_ttl": 60})
    c = QuotaClient(settings, policies=policies, clock=clock, transport=transport, follow=False)
    c.cache.mark_heard()
    return c.open()


def chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **extra}


def test_reservation_holds_prompt_plus_ceiling_until_settled(client: QuotaClient) -> None:
    r = client.reserve("k1", "gpt-4o", chat("hello there", max_tokens=1000))
    # per message 3, then "user" and the content, then 3 priming the reply
    assert (
        r.prompt_tokens
        == 3 + count_text("user", "gpt-4o") + count_text("hello there", "gpt-4o") + 3
    )
    assert r.max_output_tokens == 1000
    held = 3000 - r.prompt_tokens - 1000
    assert client.check("k1", "gpt-4o").remaining["tokens_per_minute"] == held
    # Two calls in flight: the second one sees the first one's hold.
    r2 = client.reserve("k1", "gpt-4o", chat("x", max_tokens=1000))
    with pytest.raises(QuotaExceeded) as denied:
        client.reserve("k1", "gpt-4o", chat("y", max_tokens=1000))
    assert denied.value.limit == "tokens_per_minute" and denied.value.retry_after > 0
    # Settling refunds the unused ceiling.
    record = r.settle({"prompt_tokens": 9, "completion_tokens": 41})
    assert (record.prompt_tokens, record.completion_tokens, record.estimated) == (9, 41, False)
    left = client.check("k1", "gpt-4o").remaining["tokens_per_minute"]
    assert left == 3000 - 50 - (r2.prompt_tokens + 1000)
    assert r.settle({"prompt_tokens": 1, "completion_tokens": 1}) is record, "settles once"
    r2.release()
    assert client.open_reservations == 0


def test_policy_default_ceiling_applies_when_the_request_sets_none(client: QuotaClient) -> None:
    r = client.reserve("k1", "gpt-4o", chat("hi"))
    assert r.max_output_tokens == 500
    e = client.reserve("k1", "text-embedding-3-small", {"model": "x", "input": ["a", "b c"]})
    assert e.max_output_tokens == 0 and e.prompt_tokens == 3


def test_context_manager_settles_on_exit_and_on_error(
    client: QuotaClient, transport: MemoryTransport
) -> None:
    with client.reserve("k1", "gpt-4o", chat("ok", max_tokens=10)) as r:
        r.settle({"prompt_tokens": 5, "completion_tokens": 2})
    with pytest.raises(RuntimeError), client.reserve("k1", "gpt-4o", chat("boom", max_tokens=10)):
        raise RuntimeError("provider down")
    client.close()
    records = {rec.id: rec for rec in transport.records()}
    assert records[r.id].completion_tokens == 2
    failed = [rec for rec in records.values() if rec.status == "error"]
    assert len(failed) == 1 and failed[0].completion_tokens == 0 and failed[0].estimated


def test_unsettled_reservation_expires_as_estimated(
    client: QuotaClient, clock: Clock, transport: MemoryTransport
) -> None:
    r = client.reserve("k1", "gpt-4o", chat("forgotten", max_tokens=100))
    clock.now += 61
    client.reserve("k1", "gpt-4o", chat("later", max_tokens=1)).release()  # triggers expiry
    assert r.settled and r.record is not None
    assert r.record.estimated and r.record.completion_tokens == 100
    assert r.record.prompt_tokens == r.prompt_tokens


def test_close_settles_what_is_still_open(client: QuotaClient, transport: MemoryTransport) -> None:
    r = client.reserve("k1", "gpt-4o", chat("in flight", max_tokens=7))
    assert client.close() == 0
    assert [rec.id for rec in transport.records()] == [r.id]


def sse(*events: dict[str, object]) -> bytes:
    import json

    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def delta(text: str) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def test_stream_with_final_usage_chunk_uses_it(client: QuotaClient) -> None:
    body = sse(delta("Hel"), delta("lo"),
               {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2}})  # fmt: skip
    usage = StreamUsage("gpt-4o")
    for i in range(0, len(body), 7):  # arbitrary chunk boundaries
        usage.feed_bytes(body[i : i + 7])
    assert usage.done and usage.reported and usage.completion_tokens() == 2
    r = client.reserve("k1", "gpt-4o", chat("hi", max_tokens=50))
    record = r.settle_stream(usage)
    assert (record.prompt_tokens, record.completion_tokens, record.estimated) == (12, 2, False)


def test_stream_without_usage_is_counted_and_estimated(client: QuotaClient) -> None:
    usage = StreamUsage("gpt-4o")
    usage.feed_bytes(sse(delta("The quick brown fox"), delta(" jumps over the lazy dog.")))
    expected = count_text("The quick brown fox jumps over the lazy dog.", "gpt-4o")
    r = client.reserve("k1", "gpt-4o", chat("hi", max_tokens=50))
    record = r.settle_stream(usage)
    assert record.completion_tokens == expected and record.estimated
    assert record.prompt_tokens == r.prompt_tokens


def test_cancelled_stream_settles_what_was_delivered(client: QuotaClient) -> None:
    usage = StreamUsage("gpt-4o")
    usage.feed_bytes(b"data: " + b'{"choices":[{"delta":{"content":"partial answer"}}]}' + b"\n\n")
    r = client.reserve("k1", "gpt-4o", chat("hi", max_tokens=500))
    record = r.settle_stream(usage, cancelled=True)
    assert record.status == "cancelled" and record.estimated
    assert record.completion_tokens == count_text("partial answer", "gpt-4o")


def test_a_settled_record_says_which_api_was_called(client: QuotaClient) -> None:
    embedding = {"model": "text-embedding-3-small", "input": ["a"]}
    calls = [
        (chat("hi"), None, "chat"),
        ({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}, None, "text_completion"),
        (embedding, None, "embeddings"),
        (chat("hi"), {"team": "search"}, "chat"),
        (chat("hi"), {"operation": "generate_content"}, "generate_content"),
    ]
    for body, attrs, operation in calls:
        r = client.reserve("k-op", str(body["model"]), body, attrs=attrs)
        record = r.settle(prompt_tokens=1, completion_tokens=1)
        assert record.attrs == {**(attrs or {}), "operation": operation}
    # without a request body there is nothing to tell: no label is made up
    bare = client.reserve("k-op", "gpt-4o", prompt_tokens=1, max_output_tokens=1).settle()
    assert "operation" not in bare.attrs
