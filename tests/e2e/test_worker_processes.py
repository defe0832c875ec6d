"""``quotaflow worker --processes 2`` on the embedded stack: two real workers in one consumer
group under the supervisor. Counts stay exact across a child killed mid-run (the supervisor
restarts it) and the supervisor stops both cleanly on SIGTERM, reporting each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from quotaflow import QuotaClient
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import ensure_topics, free_port
from tests.support import wait_for

pytestmark = pytest.mark.e2e

KEYS = [f"wp-key-{i}" for i in range(20)]


def get(url: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return dict(json.loads(resp.read()))
    except OSError:
        return None


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def counted(base: str) -> int:
    total = 0
    for key in KEYS:
        state = get(f"{base}/api/keys/{key}") or {}
        totals = state.get("totals") or {}
        total += int(totals.get("records", 0)) if isinstance(totals, dict) else 0
    return total


def send(settings: QuotaflowSettings, n: int, source: str) -> None:
    client_settings = settings.model_copy(deep=True)
    client_settings.client.source = source
    with QuotaClient(client_settings, follow=False) as quota:
        for i in range(n):
            quota.record(KEYS[i % len(KEYS)], "gpt-4o-mini", prompt_tokens=10)
        assert quota.close() == 0


def test_a_supervised_pair_counts_exactly_through_a_crash_and_stops_cleanly(
    settings: QuotaflowSettings, tmp_path: Path
) -> None:
    ensure_topics(settings)
    base_port = free_port()
    while free_port() == base_port + 1:  # the next port must be free too (child 1's)
        base_port = free_port()
    env = {**os.environ, **settings.to_env(), "QUOTAFLOW_WORKER__WEB_PORT": str(base_port)}
    log = (tmp_path / "supervisor.log").open("w")
    sup = subprocess.Popen([sys.executable, "-m", "quotaflow", "worker", "--processes", "2"],
                           env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    bases = [f"http://127.0.0.1:{base_port + i}" for i in range(2)]
    try:
        wait_for(lambda: all((get(b + "/api/stats") or {}).get("ready") for b in bases), 120,
                 what="both workers ready with partitions")  # fmt: skip
        first = children(sup.pid)
        assert len(first) == 2
        send(settings, 2000, "wp-a")
        wait_for(lambda: counted(bases[0]) == 2000 or None, 60, what="2000 records counted")
        os.kill(first[0], signal.SIGKILL)  # a worker dies without saving
        wait_for(lambda: (len(children(sup.pid)) == 2 and children(sup.pid) != first) or None, 30,
                 what="the supervisor to restart the killed worker")  # fmt: skip
        send(settings, 500, "wp-b")
        wait_for(lambda: all((get(b + "/readyz") or {}).get("ready") for b in bases), 180,
                 what="both workers ready again")  # fmt: skip
        # a restarted worker recovers its tables, then replays what it had not saved: on a
        # busy machine that takes a while (the wait ends as soon as the count is right)
        wait_for(lambda: counted(bases[1]) == 2500 or None, 240,
                 what="every record counted once")  # fmt: skip
        assert counted(bases[0]) == 2500
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(90) == 0, "both saved on the way out"
    finally:
        if sup.poll() is None:
            sup.kill()  # its children get SIGTERM from the kernel (PR_SET_PDEATHSIG)
            sup.wait()
        log.close()
    text = (tmp_path / "supervisor.log").read_text()
    assert not children(sup.pid), "no worker outlives its supervisor"
    assert "exited with status -9" in text and "restarting" in text
    assert text.count("stopped: saved") == 2, text[-3000:]
