"""``quotaflow gateway --processes 2``: two gateway processes share one port (SO_REUSEPORT)
under the supervisor, both serve and record, and both stop cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from quotaflow.settings import QuotaflowSettings
from quotaflow_producers.testing import OpenAIStub
from quotaflow_stream.harness import ensure_topics, free_port
from tests.support import wait_for
from tests.support.gateways import usage_records

pytestmark = pytest.mark.integration


def test_two_gateway_processes_share_a_port_and_stop_cleanly(
    settings: QuotaflowSettings, stub: OpenAIStub, tmp_path: Path
) -> None:
    ensure_topics(settings)
    port = free_port()
    env = {
        **os.environ,
        **settings.to_env(),
        "QUOTAFLOW_GATEWAY__KEY_SOURCES": '["header"]',
        "QUOTAFLOW_CLIENT__SOURCE": "gwp",
    }
    log = (tmp_path / "gateways.log").open("w")
    sup = subprocess.Popen(
        [sys.executable, "-m", "quotaflow", "gateway", "--processes", "2",
         "--upstream", f"http://127.0.0.1:{stub.port}", "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    pids: set[int] = set()
    try:

        def both_serving() -> bool:
            for _ in range(20):  # fresh connections: the kernel spreads them over the two
                try:
                    pids.add(httpx.get(base + "/healthz", timeout=2).json()["pid"])
                except httpx.HTTPError:
                    return False
            return len(pids) == 2

        wait_for(both_serving, 60, what="two gateway processes on one port")
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(30):
            r = httpx.post(base + "/v1/chat/completions", json=body,
                           headers={"x-quotaflow-key": "gwp-key"}, timeout=10)  # fmt: skip
            assert r.status_code == 200
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0
    finally:
        if sup.poll() is None:
            sup.kill()
        log.close()
    records = [r for _, r in usage_records(settings) if r.key == "gwp-key"]
    assert len(records) == 30, "every call recorded once, usage flushed on the way out"
    assert {r.source for r in records} <= {"gwp-0", "gwp-1"}
    text = (tmp_path / "gateways.log").read_text()
    assert text.count("stopped: saved") == 2, text[-2000:]
