"""`quotaflow dev up|status|down` as processes, the way a developer runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import AdminClient

pytestmark = pytest.mark.integration


def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quotaflow", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_dev_up_status_down(tmp_path: Path) -> None:
    env = {**os.environ, "QUOTAFLOW_DEV_STATE": str(tmp_path / "dev.json")}
    env.pop("QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS", None)
    up = run("dev", "up", env=env, cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        status = run("dev", "status", env=env, cwd=tmp_path)
        assert status.returncode == 0
        info = json.loads(status.stdout)
        assert info["running"] is True
        topics = AdminClient({"bootstrap.servers": info["kafka_bootstrap"]}).list_topics(timeout=10)
        assert {"quotaflow.usage", "quotaflow.decisions", "quotaflow.usage.dlq"} <= set(
            topics.topics
        )
        assert redis.Redis.from_url(info["redis_url"]).ping()
        again = run("dev", "up", env=env, cwd=tmp_path)
        assert again.returncode == 0 and "already up" in again.stdout
    finally:
        down = run("dev", "down", env=env, cwd=tmp_path)
    assert down.returncode == 0
    gone = run("dev", "status", env=env, cwd=tmp_path)
    assert gone.returncode == 1 and json.loads(gone.stdout)["running"] is False
