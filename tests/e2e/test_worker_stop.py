"""A worker's edges with the broker away: SIGTERM while the broker is unreachable ends within its
bound, says what it did not save, and loses nothing; a worker started before any broker says
once, clearly, which address failed and how to fix it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quotaflow import QuotaClient
from quotaflow_stream.harness import DevStack, WorkerProcess, ensure_topics, free_port
from quotaflow_stream.worker import EXIT_UNSAVED
from tests.support import pipeline_settings, wait_for
from tests.support.faultproxy import FaultProxy

pytestmark = pytest.mark.e2e

STOP_TIMEOUT = 3.0


def test_sigterm_with_the_broker_unreachable_stops_within_its_bound_and_loses_nothing(
    stack: DevStack, tmp_path: Path, proxied_broker: tuple[int, FaultProxy]
) -> None:
    port, proxy = proxied_broker
    settings = pipeline_settings(stack, tmp_path)
    settings.kafka.bootstrap_servers = f"127.0.0.1:{port}"
    # nothing saved on its own: every record is unsaved work when the broker goes
    settings.worker.save_interval = 3600
    settings.worker.stop_timeout = STOP_TIMEOUT
    ensure_topics(settings)
    first = WorkerProcess(settings, tmp_path / "first.log").start()
    try:
        first.wait_ready(90)
        with QuotaClient(settings, follow=False) as quota:
            for i in range(40):
                quota.record(f"stop-{i % 4}", "gpt-4o-mini", prompt_tokens=3)
        wait_for(lambda: (first.stats() or {}).get("records") == 40, what="40 records folded")
        assert (first.stats() or {})["unsaved_entries"] == 4
        proxy.cut()
        started = time.monotonic()
        code = first.stop(timeout=60)
        took = time.monotonic() - started
    finally:
        first.kill()
    log = first.log_path.read_text(errors="replace")
    assert code == EXIT_UNSAVED, f"exit {code}:\n{first.log_tail()}"
    assert took < 3 * STOP_TIMEOUT + 5, f"took {took:.1f}s to stop"
    assert re.search(r"stopping without the final save \(4 entries, \d+ usage messages", log)
    assert f"127.0.0.1:{port}" in log
    # the broker is back: the next owner reads the uncommitted messages and counts them once
    proxy.restore()
    settings.worker.save_interval = 0.5
    second = WorkerProcess(settings, tmp_path / "second.log").start()
    try:
        second.wait_ready(90)
        wait_for(lambda: (second.stats() or {}).get("records") == 40, timeout=60,
                 what="the second worker to count all 40")  # fmt: skip
        time.sleep(1.5)
        stats = second.stats() or {}
        assert stats["records"] == 40 and stats["duplicates"] == 0
    finally:
        assert second.stop() == 0


def test_a_worker_started_before_any_broker_says_which_address_and_how_to_fix_it(
    stack: DevStack, tmp_path: Path
) -> None:
    settings = pipeline_settings(stack, tmp_path)
    dead = f"127.0.0.1:{free_port()}"
    env = {**os.environ, **settings.to_env(), "QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS": dead}
    done = subprocess.run(
        [sys.executable, "-m", "quotaflow", "worker"],
        env=env, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, output
    assert dead in errors[0] and "quotaflow dev up" in errors[0]
    assert "QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS" in errors[0]
    # librdkafka's own lines ("%3|1700000000.123|FAIL|rdkafka#...") never reach the terminal
    assert not re.search(r"%\d\|\d+\.\d+\|", output), output
