"""Each fail mode with the follower really stopped: states stop arriving, the client's view ages
past the policy's ``max_staleness`` and the policy's fail mode decides."""

from __future__ import annotations

import time

import pytest

from quotaflow import QuotaClient
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import WorkerProcess
from tests.support import wait_for

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
