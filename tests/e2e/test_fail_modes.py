"""Each fail mode with the follower really stopped: states stop arriving, the client's view ages
past the policy's ``max_staleness`` and the policy's fail mode decides."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from quotaflow import QuotaClient
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import DevStack, WorkerProcess
from tests.support import pipeline_settings, running_worker, wait_for

pytestmark = pytest.mark.e2e

STALENESS = 1.0


PIPELINE_POLICIES = "version: 1\npolicies:\n" + "".join(
    f"  - {{name: {mode}, keys: ['{mode}-*'], fail_mode: {mode}, max_staleness: {STALENESS}, "
    "expected_instances: 2, limits: {requests_per_minute: 4}}\n"
    for mode in ("open", "closed", "local")
)


def test_fail_modes_once_the_follower_stops(settings: QuotaflowSettings, worker: WorkerProcess):
    client = QuotaClient(settings).open()
    try:
        assert client.wait_ready(30)
        # the local mode counts this instance's own calls per calendar minute: keep the calls
        # and the checks below inside one minute
        if time.time() % 60 > 60 - 3 * STALENESS - 10:
            time.sleep(60 - time.time() % 60 + 0.1)
        for mode in ("open", "closed", "local"):
            for _ in range(2):
                assert client.check(f"{mode}-a").reason == "ok"
                client.record(f"{mode}-a", "m")
        modes = ("open", "closed", "local")
        wait_for(
            lambda: all(client.cache.pending_count(f"{m}-a") == 0 for m in modes),
            what="the stream to acknowledge all six calls",
        )
        assert client.check("closed-a").reason == "ok", "fresh state: the limit decides"
        assert client.follower is not None
        client.follower.stop()
        time.sleep(STALENESS + 0.5)
        opened = client.check("open-a")
        assert opened.allowed and opened.reason == "stale_open"
        closed = client.check("closed-a")
        assert not closed.allowed and closed.reason == "stale_closed"
        assert closed.retry_after == STALENESS
        # local: 4 / expected_instances 2 = 2 a minute for this instance, which used 2 already
        local = client.check("local-a")
        assert not local.allowed and local.limit == "requests_per_minute"
        assert local.state_age is not None and local.state_age > STALENESS
        fresh = client.check("local-b", requests=2)
        assert fresh.allowed and fresh.reason == "stale_local"
        assert not client.check("local-b", requests=3).allowed
    finally:
        client.close()


def test_a_quiet_worker_is_told_from_a_dead_one(stack: DevStack, tmp_path: Path) -> None:
    """Idle past ``max_staleness`` with the worker alive: its heartbeats keep decisions ``ok``.
    The worker killed while the broker stays up: decisions turn ``stale_*``."""
    policies = tmp_path / "policies.yaml"
    policies.write_text(PIPELINE_POLICIES)
    settings = pipeline_settings(stack, tmp_path, policies_file=policies)  # a worker of its own
    live = running_worker(settings)
    worker = next(live)
    try:
        with QuotaClient(settings) as client:
            assert client.wait_ready(30)
            client.record("closed-quiet", "m")
            wait_for(lambda: client.cache.pending_count("closed-quiet") == 0,
                     what="the call acknowledged")  # fmt: skip
            # no usage at all for three times max_staleness: heartbeats (every 0.5 s here)
            for _ in range(6):
                time.sleep(STALENESS / 2)
                assert client.check("closed-quiet").reason == "ok"
                assert client.check("open-quiet").reason == "ok"
            worker.kill()  # the broker stays up; nothing publishes any more
            time.sleep(STALENESS + 0.5)
            closed = client.check("closed-quiet")
            assert not closed.allowed and closed.reason == "stale_closed"
            assert client.check("open-quiet").reason == "stale_open"
    finally:
        live.close()
