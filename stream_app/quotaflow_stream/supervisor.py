"""``quotaflow worker --processes N``: N stream workers on one host, in one consumer group,
under one supervisor (a worker is one Python process: one core at most).

Each child is an ordinary ``quotaflow worker`` with a web port and a data directory of its own
(``web_port + i``, ``data_dir/worker-i``), so each keeps its own probes, API and /metrics. The
supervisor restarts a child that exits on its own (with a backoff that doubles up to
:data:`MAX_BACKOFF` and resets once a child has run for :data:`HEALTHY_AFTER`), stops them all
on SIGTERM or SIGINT (each saves, as a lone worker does; stragglers are killed after the
workers' own stop time), and reports each: started, exited and why, restarted, stopped. It exits
0 if every child stopped cleanly, else the worst child's status (3: stopped without saving).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quotaflow.settings import QuotaflowSettings

log = logging.getLogger(__name__)

#: Longest wait before restarting a child that keeps exiting (seconds).
MAX_BACKOFF = 30.0
#: A child that has run this long is healthy again: its next restart is immediate.
HEALTHY_AFTER = 60.0


@dataclass
class Child:
    index: int
    web_port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        alive = self.process is not None and self.process.poll() is None
        return {
            "worker": self.index,
            "pid": self.process.pid if self.process is not None else None,
            "alive": alive,
            "web_port": self.web_port,
            "restarts": self.restarts,
            "exits": list(self.exits),
        }


class Supervisor:
    """Runs and watches ``processes`` worker children for ``settings``."""

    def __init__(
        self,
        settings: QuotaflowSettings,
        processes: int,
        *,
        loglevel: str = "info",
        command: list[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if processes < 1:
            raise ValueError("--processes must be at least 1")
        w = settings.worker
        if w.web_port == 0:
            raise ValueError("--processes needs a fixed web port: child i listens on port + i")
        self.settings = settings
        self.command = command or [sys.executable, "-m", "quotaflow", "worker",
                                   "--loglevel", loglevel]  # fmt: skip
        self.clock = clock
        self.children = [
            Child(i, w.web_port + i, Path(w.data_dir) / f"worker-{i}") for i in range(processes)
        ]
        self.stopping = threading.Event()
        self._env = {**os.environ, **settings.to_env()}
        self._env.pop("QUOTAFLOW_WORKER__WEB_PORT", None)

    def _spawn(self, child: Child) -> None:
        env = {
            **self._env,
            "QUOTAFLOW_WORKER__WEB_PORT": str(child.web_port),
            "QUOTAFLOW_WORKER__DATA_DIR": str(child.data_dir),
        }
        child.process = subprocess.Popen(self.command, env=env)
        child.started_at = self.clock()
        child.restart_at = None
        log.info("worker %d started (pid %d, web port %d)", child.index, child.process.pid,
                 child.web_port)  # fmt: skip

    def start(self) -> Supervisor:
        for child in self.children:
            self._spawn(child)
        return self

    def watch_once(self) -> None:
        """Notice children that exited on their own, and restart them when their wait is over."""
        now = self.clock()
        for child in self.children:
            process = child.process
            if child.restart_at is not None:
                if now >= child.restart_at and not self.stopping.is_set():
                    child.restarts += 1
                    self._spawn(child)
                continue
            if process is None or process.poll() is None:
                continue
            status = process.returncode
            child.exits.append(status)
            ran = now - child.started_at
            child.backoff = 0.0 if ran >= HEALTHY_AFTER else min(
                max(child.backoff * 2, 1.0), MAX_BACKOFF
            )  # fmt: skip
            child.restart_at = now + child.backoff
            log.warning("worker %d (pid %d) exited with status %s after %.0f s; restarting in "
                        "%.0f s", child.index, process.pid, status, ran, child.backoff)  # fmt: skip

    def stop(self) -> int:
        """SIGTERM every child, wait for their saves, kill stragglers; the exit status."""
        self.stopping.set()
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        # each saves within stop_timeout, then Faust stops within as long again
        deadline = time.monotonic() + 2 * self.settings.worker.stop_timeout + 5
        worst = 0
        for child in running:
            assert child.process is not None
            try:
                status = child.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.process.kill()
                status = child.process.wait()
                log.error("worker %d (pid %d) did not stop in time: killed", child.index,
                          child.process.pid)  # fmt: skip
            child.exits.append(status)
            verdict = "saved" if status == 0 else "stopped without saving" if status == 3 else (
                f"status {status}"
            )  # fmt: skip
            log.info("worker %d (pid %d) stopped: %s", child.index, child.process.pid, verdict)
            worst = max(worst, status if status > 0 else (1 if status < 0 else 0))
        return worst

    def run(self, interval: float = 0.5) -> int:
        """Start, watch until SIGTERM/SIGINT, stop; the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.start()
        while not self.stopping.wait(interval):
            self.watch_once()
        return self.stop()
