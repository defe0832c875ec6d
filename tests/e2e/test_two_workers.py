"""Two workers share the partitions (one consumer group); either one's API answers for every
key: its own from its table, the other's from the Redis snapshot."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from quotaflow import QuotaClient
from quotaflow.partitioner import partition_for
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import DevStack, WorkerProcess, free_port
from tests.support import pipeline_settings, wait_for

pytestmark = pytest.mark.e2e


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


def test_a_rebalance_saves_first_when_a_second_worker_joins(
    stack: DevStack, tmp_path: Path
) -> None:
    """Worker a has folded usage it has not saved (its save interval is an hour). Worker b joins:
    a's revoke saves and acks first, so b recovers a's counts from the changelog and reads none
    of those messages again; afterwards the two count new usage, exactly."""
    from quotaflow_stream.topics import ensure_topics

    settings = pipeline_settings(stack, tmp_path)
    settings.worker.save_interval = 3600
    ensure_topics(settings)

    def start(i: int) -> WorkerProcess:
        s = settings.model_copy(deep=True)
        s.worker.web_port = free_port()
        s.worker.data_dir = Path(f"{settings.worker.data_dir}-{i}")
        return WorkerProcess(s, tmp_path / f"worker-{i}.log").start()

    keys = [f"rb-{i}" for i in range(16)]
    a = start(0)
    b: WorkerProcess | None = None
    try:
        a.wait_ready(90)
        with QuotaClient(settings, follow=False) as client:
            for i in range(400):
                client.record(keys[i % 16], "gpt-4o-mini", prompt_tokens=2)
        wait_for(lambda: (a.stats() or {}).get("records") == 400, what="a to fold 400")
        assert (a.stats() or {})["saves"] == 0, "nothing saved before the rebalance"
        b = start(1)
        b.wait_ready(120)
        wait_for(lambda: (a.stats() or {}).get("ready"), what="a ready after the rebalance")
        assert (a.stats() or {})["saves"] >= 1, "a saved when its partitions were revoked"
        time.sleep(2)
        assert (b.stats() or {})["records"] == 0, "b read none of a's saved messages again"
        with QuotaClient(settings, follow=False) as client:
            for i in range(160):
                client.record(keys[i % 16], "gpt-4o-mini", prompt_tokens=2)
        for key in keys:
            wait_for(lambda key=key: key_records(a.base_url, key) == 35, timeout=30,
                     what=f"{key}: 25 before the join and 10 after, counted once")  # fmt: skip
        both = [(w.stats() or {}) for w in (a, b)]
        assert sum(s["records"] for s in both) == 560 and all(s["duplicates"] == 0 for s in both)
        assert both[1]["records"] > 0, "b took partitions over and counts their new usage"
    finally:
        for w in (a, b):
            if w is not None:
                w.stop()


def key_records(base: str, key: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{base}/api/keys/{key}", timeout=5) as resp:
            return int(json.loads(resp.read())["totals"]["records"])
    except OSError:
        return None
