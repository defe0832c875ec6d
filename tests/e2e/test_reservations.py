"""Reservation and settlement end to end: the instrumented openai client against the local
OpenAI-compatible server, usage through the real broker to the worker, and the fleet's view."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from quotaflow import QuotaClient
from quotaflow.integrations.openai import instrument
from quotaflow.settings import QuotaflowSettings
from quotaflow.tokens import count_request, count_text
from quotaflow_producers.testing import REPLY, OpenAIStub
from quotaflow_stream.harness import WorkerProcess
from tests.support import wait_for

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "How many tokens is this?"}]
OFFSET = 7  # tokens the local upstream adds to what it reports


PIPELINE_POLICIES = """
version: 1
policies:
  - name: res
    keys: ["res-*"]
    limits: {tokens_per_hour: 600}
    max_staleness: 30
"""


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    s = OpenAIStub().start()
    yield s
    s.stop()


def test_settled_usage_reaches_the_worker_and_the_fleet(
    settings: QuotaflowSettings, worker: WorkerProcess, stub: OpenAIStub
) -> None:
    a_cfg, b_cfg = settings.model_copy(deep=True), settings.model_copy(deep=True)
    a_cfg.client.source, b_cfg.client.source = "res-a", "res-b"
    # the provider's counts differ from a local count: what was settled shows whose it took
    stub.usage_offset = OFFSET
    with QuotaClient(a_cfg) as quota_a, QuotaClient(b_cfg) as quota_b:
        assert quota_a.wait_ready(30) and quota_b.wait_ready(30)
        base = openai.OpenAI(base_url=stub.base_url, api_key="sk-test-x", max_retries=0)
        client = instrument(base, quota=quota_a, key="res-team")
        for _ in range(2):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=150)
        # a streamed call too: settled from its final usage chunk as the stream ends
        streamed = client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=150, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == REPLY
        stub.usage_offset = 0
        prompt = count_request({"model": "gpt-4o", "messages": MESSAGES}).tokens + OFFSET
        completion = count_text(REPLY, "gpt-4o") + OFFSET
        spent = 3 * (prompt + completion)
        # The worker counted exactly the settled usage (not the 150-token holds), and
        # instance b, which made no call, sees it.
        state = wait_for(
            lambda: (s := quota_b.cache.state("res-team")) and s.totals.records == 3 and s,
            what="three settled calls on instance b",
        )
        assert state.totals.tokens == spent
        assert state.totals.prompt_tokens == 3 * prompt
        # A reservation on b that no longer fits is refused before any HTTP call.
        room = 600 - spent
        with pytest.raises(Exception) as err:
            quota_b.reserve("res-team", "gpt-4o", {"model": "gpt-4o", "messages": MESSAGES,
                                                    "max_tokens": room})  # fmt: skip
        assert type(err.value).__name__ == "QuotaExceeded"
        # One that fits is held locally, then settled: the stream counts the settled amount.
        held = quota_b.reserve("res-team", "gpt-4o", prompt_tokens=10, max_output_tokens=20)
        assert quota_b.check("res-team", "gpt-4o", tokens=0).remaining[
            "tokens_per_hour"
        ] == 600 - spent - 30  # fmt: skip
        held.settle({"prompt_tokens": 10, "completion_tokens": 5})
        wait_for(
            lambda: (s := quota_a.cache.state("res-team")) and s.totals.tokens == spent + 15,
            what="the settled reservation on instance a",
        )
