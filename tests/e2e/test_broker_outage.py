"""The broker cut off for 30 s under load, through a fault-injecting proxy (the broker keeps
its data; the network fails). record() keeps returning at once, check() goes on under the fail
mode, records past the memory bounds go to the journal, and after the link is back every record
arrives and is counted exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from quotaflow import QuotaClient
from quotaflow.settings import QuotaflowSettings
from quotaflow.stats import percentile
from quotaflow_stream import audit
from quotaflow_stream.harness import DevStack, WorkerProcess
from quotaflow_stream.topics import ensure_topics
from tests.support import pipeline_settings, wait_for
from tests.support.faultproxy import FaultProxy

pytestmark = pytest.mark.e2e

OUTAGE = 30.0


def test_thirty_seconds_without_the_broker(
    stack: DevStack, tmp_path: Path, proxied_broker: tuple[int, FaultProxy]
) -> None:
    port, proxy = proxied_broker
    settings: QuotaflowSettings = pipeline_settings(stack, tmp_path)
    settings.kafka.bootstrap_servers = f"127.0.0.1:{port}"
    ensure_topics(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    client_settings = settings.model_copy(deep=True)
    # small memory bounds, so a 30 s outage reaches the journal
    client_settings.kafka.client_options = {"queue.buffering.max.messages": "200"}
    client_settings.client.max_buffered = 500
    client_settings.client.journal_dir = tmp_path / "journal"
    client_settings.client.source = "outage-instance"
    try:
        worker.wait_ready(90)
        client = QuotaClient(client_settings).open()
        assert client.wait_ready(30)
        sent = 0
        took: list[float] = []
        stop = threading.Event()

        def load() -> None:
            nonlocal sent
            while not stop.wait(0.004):
                t0 = time.perf_counter()
                client.record(f"outage-{sent % 10}", "gpt-4o-mini", prompt_tokens=5)
                took.append(time.perf_counter() - t0)
                sent += 1

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        time.sleep(3)
        proxy.cut()
        cut_at = time.monotonic()
        time.sleep(OUTAGE / 2)
        # the stream is silent: the default policy's fail mode (open) decides, at once
        d = client.check("outage-0", "gpt-4o-mini")
        assert d.allowed and d.reason == "stale_open"
        time.sleep(OUTAGE - (time.monotonic() - cut_at))
        journal = client.emitter.journal if client.emitter else None
        assert journal is not None and journal.written > 0, "the outage reached the journal"
        proxy.restore()
        time.sleep(5)
        stop.set()
        thread.join()
        # record() returns at once through the outage: the p99 (one slow call on a busy
        # 2-core machine is preemption, not the broker)
        p99 = percentile(took, 99) or 0.0
        assert p99 < 0.005, f"record() p99 {p99 * 1000:.2f} ms over {len(took)} calls"
        emitter = client.emitter
        assert emitter is not None
        left = client.close(timeout=60)
        transport = emitter.transport
        assert left == 0, (
            f"undelivered {left}: journal written {journal.written} replayed {journal.replayed} "
            f"dropped {journal.dropped}; buffered {emitter.buffered}; sent {sent}; delivered "
            f"{getattr(transport, 'delivered', '?')} failed {getattr(transport, 'failed', '?')}"
        )
        assert journal is not None and not journal and journal.dropped == 0
        wait_for(
            lambda: (worker.stats(timeout=2) or {}).get("records") == sent,
            timeout=120, interval=1.0, what=f"the worker to count all {sent} records",
        )  # fmt: skip
        assert sum(1 for _ in audit.scan_usage(settings)) == sent, "each record once in the trail"
        stats = worker.stats() or {}
        assert stats["records"] == sent
    finally:
        worker.stop()
