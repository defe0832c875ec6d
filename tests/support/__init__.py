"""What tests share besides fixtures: settings for a pipeline of a test's own on the shared
stack, a worker for it, and polling. Stand-ins for unit tests are in :mod:`tests.support.fakes`,
the fault-injecting proxy in :mod:`tests.support.faultproxy`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from quotaflow.settings import QuotaflowSettings, load_settings
from quotaflow_stream.harness import DevStack, WorkerProcess, ensure_topics, free_port

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def pipeline_settings(
    stack: DevStack, workdir: Path, policies_file: Path | None = None, partitions: int = 4
) -> QuotaflowSettings:
    """Settings for an isolated pipeline on the shared stack."""
    run = uuid.uuid4().hex[:8]
    return load_settings(
        kafka={"bootstrap_servers": stack.kafka_bootstrap},
        redis={"url": stack.redis_url, "key_prefix": f"qf-test-{run}"},
        topics={
            "usage": f"t-{run}.usage",
            "decisions": f"t-{run}.decisions",
            "dlq": f"t-{run}.dlq",
            "alerts": f"t-{run}.alerts",
            "policies": f"t-{run}.policies",
            "partitions": partitions,
        },
        worker={
            "app_id": f"qf-test-{run}",
            "web_port": free_port(),
            "data_dir": str(workdir / f"worker-{run}"),
            "heartbeat_interval": 0.5,
        },
        client={"flush_interval": 0.01},
        gateway={"key_salt": f"test-salt-{run}"},
        policies_file=str(policies_file or ROOT / "config" / "policies.yaml"),
    )


def running_worker(settings: QuotaflowSettings) -> Iterator[WorkerProcess]:
    """A ready worker for ``settings`` (topics created), stopped afterwards; for fixtures."""
    ensure_topics(settings)
    worker = WorkerProcess(settings, Path(settings.worker.data_dir).parent / "worker.log")
    worker.start().wait_ready(90)
    yield worker
    worker.stop()


def wait_for(
    probe: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:g}s waiting for {what or probe} (last={last!r})"
    )
