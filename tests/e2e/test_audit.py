"""The audit trail end to end: SDK traffic, duplicate deliveries and a replayed log (twice) go
through the real broker and worker; the audit commands read the topic back, and reconcile finds
the worker's aggregates and the Redis snapshot equal to an exact recount."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from quotaflow import QuotaClient
from quotaflow.settings import QuotaflowSettings
from quotaflow_producers.replay import replay
from quotaflow_stream.harness import WorkerProcess
from tests.support import wait_for

pytestmark = pytest.mark.e2e


def cli(settings: QuotaflowSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run(
        [sys.executable, "-m", "quotaflow", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_duplicates_and_replays_reconcile_to_zero(
    settings: QuotaflowSettings, worker: WorkerProcess, tmp_path: Path
) -> None:
    now = time.time()
    with QuotaClient(settings) as client:
        assert client.wait_ready(30)
        sent = [
            client.record(f"aud-{i % 3}", "gpt-4o" if i % 2 else "gpt-4o-mini",
                          prompt_tokens=10 + i, completion_tokens=i)
            for i in range(30)
        ]  # fmt: skip
    # duplicate deliveries: ten of those records again, as another producer would retry them
    producer = Producer({**settings.kafka.confluent_config(), "partitioner": "murmur2_random"})
    for r in sent[:10]:
        doc = {**r._asdict(), "attrs": dict(r.attrs or {})}
        producer.produce(settings.topics.usage, key=r.key.encode(), value=json.dumps(doc).encode())
    assert producer.flush(10) == 0
    # a usage log: new records, one two days old, one invalid row
    log = tmp_path / "usage.jsonl"
    rows = [
        {"id": f"imported-{i}", "ts": now - 30 - i, "key": "aud-imported", "model": "gpt-4o",
         "prompt_tokens": 100, "completion_tokens": 5, "source": "billing-export"}
        for i in range(5)
    ]  # fmt: skip
    rows.append({**rows[0], "id": "imported-old", "ts": now - 2 * 86400})
    lines = [json.dumps(r) for r in rows] + ['{"id": "bad", "ts": -1}']
    log.write_text("\n".join(lines) + "\n")
    report = replay(settings, log)
    assert report.sent == 6 and len(report.invalid) == 1 and "usage.jsonl:7" in report.invalid[0]
    assert report.late_all_windows == 1
    again = replay(settings, log)  # idempotent: the same ids never count twice
    assert again.sent == 6

    def imported_counted() -> bool:
        stats = worker.stats() or {}
        return stats.get("duplicates", 0) >= 16 and stats.get("records", 0) >= 36

    wait_for(imported_counted, timeout=30, what="the worker to count and drop duplicates")
    stats = worker.stats() or {}
    assert stats["records"] == 36 and stats["duplicates"] == 16  # 10 retried + 6 replayed

    done = cli(settings, "audit", "reconcile", "--json", "--settle", "10")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["differences"] == [] and result["keys"] == 4
    assert result["scan"]["records"] == 36 and result["scan"]["duplicates"] == 16, result

    # the audit commands read the same trail
    q = cli(settings, "audit", "query", "--key", "aud-1", "--from", "1h", "--format", "jsonl")
    assert q.returncode == 0, q.stderr
    got = [json.loads(line) for line in q.stdout.splitlines()]
    assert sorted(r["id"] for r in got) == sorted(r.id for r in sent if r.key == "aud-1")
    t = cli(settings, "audit", "totals", "--by", "key,model", "--window", "day", "--format", "csv")
    assert t.returncode == 0, t.stderr
    totals = {(r["key"], r["model"]): r for r in csv.DictReader(t.stdout.splitlines())}
    # the replayed log is v1 (no cost): it counts as before, and the audit and the worker
    # (whose totals reconcile above) price it from the same table, at 100 + 5 tokens of gpt-4o
    imported = [r for r in csv.DictReader(t.stdout.splitlines()) if r["key"] == "aud-imported"]
    # (rows per UTC day: the two-day-old record has a day of its own)
    assert sum(int(r["records"]) for r in imported) == 6
    assert sum(int(r["cost_micros"]) for r in imported) == 6 * 300
    assert "0.000300" in {r["cost_usd"] for r in imported}, "the old one's day: one call"
    assert all(r["unpriced"] == "0" for r in imported)
    mini = [r for r in sent if r.key == "aud-0" and r.model == "gpt-4o-mini"]
    assert int(totals[("aud-0", "gpt-4o-mini")]["records"]) == len(mini)
    assert int(totals[("aud-0", "gpt-4o-mini")]["prompt_tokens"]) == sum(
        r.prompt_tokens for r in mini
    )
    out = tmp_path / "trail.parquet"
    e = cli(settings, "audit", "export", "--to", str(out))
    assert e.returncode == 0, e.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.num_rows == 36 and len(set(table.column("id").to_pylist())) == 36


def test_reconcile_reports_a_difference_and_fails(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis.url)
    try:
        raw = client.hget(settings.redis.states_hash, "aud-0")
        assert raw is not None
        doc = json.loads(raw)
        doc["key"] = "aud-ghost"  # a key the snapshot has and the trail never saw
        client.hset(settings.redis.states_hash, "aud-ghost", json.dumps(doc))
        done = cli(settings, "audit", "reconcile", "--settle", "0", "--no-worker")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "aud-ghost: snapshot records = " in done.stdout
        assert "the topic says 0" in done.stdout
    finally:
        client.hdel(settings.redis.states_hash, "aud-ghost")
        client.close()
