"""Alerts end to end: a real worker fires them from the usage it counts, the forwarder POSTs
them to a webhook on loopback, and across a worker kill -9 each threshold still reaches the
webhook once (a repeat the next owner sends carries the same id and is dropped)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotaflow import QuotaClient
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import WorkerProcess, free_port
from quotaflow_stream.topics import ensure_topics
from quotaflow_stream.webhook import AlertForwarder, WebhookSender
from tests.support import wait_for
from tests.support.webhook import Receiver

pytestmark = pytest.mark.e2e

# A day period: the test never sees it roll over (unless it runs across midnight UTC).
PIPELINE_POLICIES = """
policies:
  - name: soft
    keys: ["alert-*"]
    alerts: [0.5, 0.8, 1.0]
    limits: {requests_per_day: 40}
"""


def worker(settings: QuotaflowSettings) -> WorkerProcess:
    s = settings.model_copy(deep=True)
    s.worker.web_port = free_port()
    return WorkerProcess(s, Path(f"{s.worker.data_dir}.log"))


def topic_values(settings: QuotaflowSettings, topic: str, idle: float = 2.0) -> list[bytes]:
    """Every message of ``topic``: read until nothing comes for ``idle`` seconds (Tansu's
    watermarks can stop short of the last offset, so they are no end to trust)."""
    import time

    from confluent_kafka import TopicPartition

    from quotaflow._kafka import consumer

    c = consumer(settings.kafka.confluent_config(), "alerts-test-reader")
    c.assign([TopicPartition(topic, p, 0) for p in range(settings.topics.partitions)])
    values: list[bytes] = []
    last = time.monotonic()
    while time.monotonic() - last < idle:
        for msg in c.consume(100, timeout=0.2):
            if msg.error() is None:
                values.append(msg.value())
                last = time.monotonic()
    c.close()
    return values


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_each_threshold_reaches_the_webhook_once_across_a_kill_9(
    settings: QuotaflowSettings, receiver: Receiver
) -> None:
    ensure_topics(settings)
    forwarder = AlertForwarder(settings, WebhookSender(receiver.url, b"hook-secret"))
    done = threading.Event()
    follow = threading.Thread(target=forwarder.run, kwargs={"until": done.is_set}, daemon=True)
    follow.start()
    proc = worker(settings).start()
    quota = QuotaClient(settings).open()
    try:
        proc.wait_ready(90)

        def thresholds() -> list[float]:
            return [json.loads(body)["threshold"] for _, body in receiver.received]

        for _ in range(21):  # 21 of 40: past half
            quota.record("alert-a", "gpt-4o-mini", prompt_tokens=5)
        wait_for(lambda: thresholds() == [0.5], timeout=30, what="the 0.5 alert at the webhook")
        proc.kill()  # SIGKILL: its last alert's mark may or may not be saved
        proc = worker(settings).start()
        proc.wait_ready(120)
        for _ in range(12):  # 33 of 40: past 0.8
            quota.record("alert-a", "gpt-4o-mini", prompt_tokens=5)
        wait_for(lambda: 0.8 in thresholds(), timeout=60, what="the 0.8 alert")
        for _ in range(7):  # 40 of 40
            quota.record("alert-a", "gpt-4o-mini", prompt_tokens=5)
        wait_for(lambda: 1.0 in thresholds(), timeout=60, what="the 1.0 alert")
        # the recovered worker republishes every key: a repeat would come now, if at all
        wait_for(lambda: forwarder.delivered >= 3, timeout=10, what="three deliveries")
        threading.Event().wait(3)
        assert thresholds() == [0.5, 0.8, 1.0], "each threshold once"
        events = [json.loads(body) for _, body in receiver.received]
        assert len({e["id"] for e in events}) == 3
        assert all(e["key"] == "alert-a" and e["limit"] == "requests_per_day" for e in events)
        assert [e["used"] >= e["threshold"] * 40 for e in events] == [True] * 3
        headers = receiver.received[0][0]
        assert headers["X-Quotaflow-Signature"].startswith("sha256=")
        # on the topic: the 0.5 alert at most twice (the crash may have beaten its mark's
        # save), the later ones, with no crash after them, exactly once
        on_topic = [
            json.loads(v)["threshold"] for v in topic_values(settings, settings.topics.alerts)
        ]
        assert on_topic.count(0.8) == on_topic.count(1.0) == 1, on_topic
        assert 1 <= on_topic.count(0.5) <= 2, on_topic
        print("repeats the forwarder dropped:", forwarder.repeats)
    finally:
        quota.close()
        done.set()
        follow.join(10)
        proc.stop()
