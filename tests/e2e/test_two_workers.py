"""Two workers share the partitions (one consumer group); either one's API answers for every
key: its own from its table, the other's from the Redis snapshot."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotaflow import QuotaClient
from quotaflow.partitioner import partition_for
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import WorkerProcess, free_port
from tests.support import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workers(settings: QuotaflowSettings) -> Iterator[list[WorkerProcess]]:
    from quotaflow_stream.topics import ensure_topics

    ensure_topics(settings)
    started = []
    for i in range(2):
        s = settings.model_copy(deep=True)
        s.worker.web_port = free_port()
        s.worker.data_dir = Path(f"{settings.worker.data_dir}-{i}")
        started.append(WorkerProcess(s, s.worker.data_dir.parent / f"worker-{i}.log").start())
    try:
        for w in started:
            w.wait_ready(90)
        yield started
    finally:
        for w in started:
            w.stop()


def keys_of(base: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{base}/api/keys", timeout=5) as resp:
        return {r["key"]: r["totals"]["records"] for r in json.loads(resp.read())["keys"]}


def test_either_worker_answers_for_every_key(
    settings: QuotaflowSettings, workers: list[WorkerProcess]
) -> None:
    # one key on each of the four partitions, so both workers own some
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < 4:
        key = f"tw-{i}"
        keys.setdefault(partition_for(key.encode(), 4), key)
        i += 1
    with QuotaClient(settings) as client:
        client.wait_ready(30)
        for n, key in enumerate(sorted(keys.values())):
            for _ in range(n + 1):
                client.record(key, "gpt-4o-mini", prompt_tokens=3)
    expected = {key: n + 1 for n, key in enumerate(sorted(keys.values()))}
    for w in workers:
        wait_for(
            lambda w=w: {k: v for k, v in keys_of(w.base_url).items() if k in expected} == expected,
            timeout=30,
            what=f"worker {w.base_url} to list every key",
        )
        for key, count in expected.items():
            with urllib.request.urlopen(f"{w.base_url}/api/keys/{key}", timeout=5) as resp:
                assert json.loads(resp.read())["totals"]["records"] == count
    owned = [(w.stats() or {}).get("records", 0) for w in workers]
    assert sum(owned) == sum(expected.values()) and all(owned), owned
