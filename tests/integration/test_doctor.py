"""``quotaflow doctor`` against the real broker, Redis and a running worker, and against
backends that are not there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quotaflow import QuotaClient
from quotaflow.settings import GatewaySettings, QuotaflowSettings
from quotaflow_stream.doctor import run_checks
from quotaflow_stream.harness import DevStack, WorkerProcess, free_port
from tests.support import pipeline_settings, wait_for

pytestmark = pytest.mark.integration


def test_a_healthy_pipeline_passes_every_check(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    with QuotaClient(settings) as client:
        client.wait_ready(30)
        client.record("doc-key", "gpt-4o", prompt_tokens=1)
    wait_for(lambda: (worker.stats() or {}).get("records") == 1, what="the record counted")

    def all_ok() -> bool:
        return all(c.status == "ok" for c in run_checks(settings, timeout=5))

    # the worker commits its offsets every few seconds: lag turns ok once it has
    wait_for(all_ok, timeout=30, interval=1.0, what="every doctor check to pass")
    names = {c.name for c in run_checks(settings, timeout=5)}
    assert {"broker", "redis", "consumer lag", "worker clock", "clock vs redis"} <= names
    assert f"{settings.topics.decisions} cleanup.policy" in names


def test_missing_backends_fail_with_fixes_and_no_password(settings: QuotaflowSettings) -> None:
    env = {
        **os.environ,
        **settings.to_env(),
        "QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "QUOTAFLOW_REDIS__URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "quotaflow", "doctor", "--timeout", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "[FAIL] broker" in done.stdout and "QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS" in done.stdout
    assert "[FAIL] redis" in done.stdout and "fix: check QUOTAFLOW_REDIS__URL" in done.stdout
    assert "hunter2" not in done.stdout + done.stderr


def test_missing_topics_and_the_default_salt_each_show_as_a_row_with_its_fix(
    stack: DevStack, tmp_path: Path
) -> None:
    fresh = pipeline_settings(stack, tmp_path)  # its topics were never created
    fresh.gateway = GatewaySettings()  # the shipped salt, on loopback
    rows = {c.name: c for c in run_checks(fresh, timeout=3)}
    for name in ("consumer lag", "worker clock"):
        assert rows[name].status == "fail", rows[name]
        assert "quotaflow topics create" in rows[name].fix
    assert rows["gateway key salt"].status == "warn"
    assert "QUOTAFLOW_GATEWAY__KEY_SALT" in rows["gateway key salt"].fix
    fresh.gateway = GatewaySettings(listen_host="0.0.0.0")
    assert {c.name: c for c in run_checks(fresh, timeout=3)}["gateway key salt"].status == "fail"


def test_a_forged_heartbeat_does_not_hide_the_clock_row(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    from quotaflow._kafka import producer
    from quotaflow.state import HEARTBEAT_KEY

    out = producer(settings.kafka.confluent_config())
    for partition in range(settings.topics.partitions):
        out.produce(settings.topics.decisions, key=HEARTBEAT_KEY.encode(), value=b"{not json",
                    partition=partition)  # fmt: skip
    assert out.flush(10) == 0
    rows = {c.name: c for c in run_checks(settings, timeout=5)}
    assert rows["worker clock"].status == "ok", rows["worker clock"]


def test_doctor_flags_a_worker_not_on_the_live_policy_version(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    import json
    import time

    from quotaflow._kafka import producer
    from quotaflow.policy_topic import publish
    from quotaflow.state import HEARTBEAT_KEY

    doc = {"policies": [{"name": "d", "default": True, "limits": {"requests_per_minute": 5}}]}
    version = publish(settings, doc, author="doctor-test", message="", expect_version=None)
    wait_for(lambda: (worker.stats() or {}).get("policy_version") == version.version, 10)

    def row() -> object:
        found = {c.name: c for c in run_checks(settings, timeout=5)}["policy version"]
        return found if found.status == "ok" else None

    ok = wait_for(row, 20, interval=0.5, what="the worker's heartbeat on the new version")
    assert f"on v{version.version}" in ok.detail  # type: ignore[attr-defined]
    # a member still on its file (a heartbeat as such a worker writes it)
    out = producer(settings.kafka.confluent_config())
    beat = {"v": 3, "heartbeat": True, "published_at": time.time(), "worker": "old-worker",
            "instances": 0, "policy_version": None}  # fmt: skip
    out.produce(settings.topics.decisions, key=HEARTBEAT_KEY.encode(),
                value=json.dumps(beat).encode(), partition=0)  # fmt: skip
    assert out.flush(10) == 0
    rows = {c.name: c for c in run_checks(settings, timeout=5)}
    assert rows["policy version"].status == "warn"
    assert "old-worker: file" in rows["policy version"].detail
