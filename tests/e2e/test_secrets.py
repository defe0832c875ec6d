"""No raw API key leaves the process: run the pipeline with known secrets (callers through the
gateway, a producer that keys usage by a raw key, an SDK call given one) and search everything
quotaflow wrote — every topic (usage, decisions, dead letters, the worker's changelog), every
Redis key and value, and every log line."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import openai
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from quotaflow import QuotaClient
from quotaflow._exceptions import RecordError
from quotaflow.settings import GatewaySettings, QuotaflowSettings
from quotaflow_producers.gateway.runner import GatewayThread
from quotaflow_producers.testing import OpenAIStub
from quotaflow_stream.harness import WorkerProcess, free_port
from tests.support import wait_for

pytestmark = pytest.mark.e2e

SECRET = f"sk-proj-LEAKCHECK{uuid.uuid4().hex}"
PRODUCER_SECRET = f"sk-live-LEAKCHECK{uuid.uuid4().hex}"


def all_topic_bytes(settings: QuotaflowSettings) -> list[bytes]:
    """Keys, values and headers of every message in every topic of this run."""
    consumer = Consumer({**settings.kafka.confluent_config(), "group.id": "leak-scan",
                         "enable.auto.commit": False})  # fmt: skip
    found: list[bytes] = []
    skipped: list[int] = []
    try:
        meta = consumer.list_topics(timeout=10)
        names = [
            n for n in meta.topics
            if n in (settings.topics.usage, settings.topics.decisions, settings.topics.dlq)
            or n.startswith(settings.worker.app_id)
        ]  # fmt: skip
        assert len(names) >= 4, names  # the three topics and the table's changelog
        consumer.assign([TopicPartition(n, p, 0) for n in names for p in meta.topics[n].partitions])
        idle = 0
        deadline = time.monotonic() + 60
        while idle < 4 and time.monotonic() < deadline:
            batch = consumer.consume(500, timeout=0.5)
            idle = 0 if batch else idle + 1
            for msg in batch:
                if msg.error() is not None:
                    continue
                if msg.topic() == settings.topics.usage and msg.key() == PRODUCER_SECRET.encode():
                    # the misbehaving producer's own message: written by it, not by quotaflow
                    skipped.append(msg.offset())
                    continue
                found += [msg.key() or b"", msg.value() or b""]
                found += [v or b"" for _, v in msg.headers() or []]
    finally:
        consumer.close()
    assert len(skipped) == 1, "the raw producer's message was read (and only it skipped)"
    return found


def all_redis_bytes(settings: QuotaflowSettings) -> list[bytes]:
    client = redis.Redis.from_url(settings.redis.url)
    found: list[bytes] = []
    try:
        for key in client.scan_iter(count=1000):
            found.append(key)
            kind = client.type(key)
            if kind == b"hash":
                for k, v in client.hgetall(key).items():
                    found += [k, v]
            elif kind == b"string":
                found.append(client.get(key) or b"")
    finally:
        client.close()
    return found


def test_no_raw_api_key_is_written_anywhere(
    settings: QuotaflowSettings,
    worker: WorkerProcess,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = OpenAIStub().start()
    gw_settings = settings.model_copy(deep=True)
    gw_settings.gateway = GatewaySettings.model_validate(
        {**gw_settings.gateway.model_dump(), "upstream": f"http://127.0.0.1:{stub.port}",
         "listen_port": free_port()}
    )  # fmt: skip
    quota = QuotaClient(gw_settings).open()
    gw = GatewayThread(gw_settings, quota).start()
    try:
        # callers through the gateway: counted under the HMAC id of their key
        caller = openai.OpenAI(base_url=gw.base_url, api_key=SECRET, max_retries=0)
        for _ in range(3):
            caller.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        # a producer that keys usage by a raw credential: rejected, and the dead letter redacted
        producer = Producer(settings.kafka.confluent_config())
        doc = {"id": "leak-1", "ts": 1.0e9, "key": PRODUCER_SECRET, "model": "m", "source": "x"}
        producer.produce(settings.topics.usage, key=PRODUCER_SECRET.encode(),
                         value=json.dumps(doc).encode())  # fmt: skip
        assert producer.flush(10) == 0
        # an SDK call handed a raw key is refused without echoing it
        with pytest.raises(RecordError) as err:
            quota.record(SECRET, "gpt-4o-mini", prompt_tokens=1)
        assert SECRET not in str(err.value)
        wait_for(lambda: (worker.stats() or {}).get("dlq") == 1, what="the dead letter")
        wait_for(lambda: (worker.stats() or {}).get("records") == 3, what="the gateway's usage")
        # the provider, and only the provider, gets the key
        assert stub.authorizations == [f"Bearer {SECRET}"] * 3
    finally:
        gw.stop()
        quota.close()
        stub.stop()
    wait_for(lambda: all_redis_bytes(settings), what="the Redis snapshot")
    worker.stop()  # nothing more gets written (heartbeats) while we search
    written = {
        "topics": all_topic_bytes(settings),
        "redis": all_redis_bytes(settings),
        "worker log": [worker.log_path.read_bytes()],
        "in-process logs": [caplog.text.encode()],
    }
    assert written["topics"] and written["redis"], "there is something to search"
    for secret in (SECRET, PRODUCER_SECRET):
        for where, blobs in written.items():
            for blob in blobs:
                assert secret.encode() not in blob, f"{where} holds a raw API key"
                # and not its distinctive part either (a key with its prefix cut off)
                assert secret[-32:].encode() not in blob, f"{where} holds part of an API key"
