"""``quotaflow worker --processes N`` and ``quotaflow gateway --processes N``: N processes of one
role on one host under one supervisor (a Python process uses one core at most).

Workers: each child is an ordinary ``quotaflow worker`` in the same consumer group, with a web
port and a data directory of its own (``web_port + i``, ``data_dir/worker-i``), so each keeps its
own probes, API and /metrics. Gateways: each child listens on the same port (``SO_REUSEPORT``:
the kernel spreads connections) with a usage source and journal of its own. The supervisor
restarts a child that exits on its own (with a backoff that doubles up to
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
    #: What this child's environment adds to the supervisor's (its port, directories, name).
    env: dict[str, str]
    web_port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        alive = self.process is not None and self.process.poll() is None
        return {
            "index": self.index,
            "pid": self.process.pid if self.process is not None else None,
            "alive": alive,
            "web_port": self.web_port,
            "restarts": self.restarts,
            "exits": list(self.exits),
        }


class Supervisor:
    """Runs and watches one child per entry of ``children`` (their environments), each running
    ``command``; ``stop_timeout`` is how long one takes to stop cleanly at most."""

    def __init__(
        self,
        children: list[Child],
        command: list[str],
        *,
        env: dict[str, str],
        stop_timeout: float,
        role: str = "worker",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not children:
            raise ValueError("--processes must be at least 1")
        self.children = children
        self.command = command
        self.stop_timeout = stop_timeout
        self.role = role
        self.clock = clock
        self.stopping = threading.Event()
        self._env = env

    @classmethod
    def workers(
        cls,
        settings: QuotaflowSettings,
        processes: int,
        *,
        loglevel: str = "info",
        command: list[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Supervisor:
        """``processes`` workers of one consumer group: worker i on web port ``web_port + i``
        with data in ``data_dir/worker-i``."""
        if processes < 1:
            raise ValueError("--processes must be at least 1")
        w = settings.worker
        if w.web_port == 0:
            raise ValueError("--processes needs a fixed web port: child i listens on port + i")
        children = [
            Child(
                i,
                {
                    "QUOTAFLOW_WORKER__WEB_PORT": str(w.web_port + i),
                    "QUOTAFLOW_WORKER__DATA_DIR": str(Path(w.data_dir) / f"worker-{i}"),
                },
                web_port=w.web_port + i,
            )
            for i in range(processes)
        ]
        command = command or [sys.executable, "-m", "quotaflow", "worker", "--loglevel", loglevel]
        # each saves within stop_timeout, then Faust stops within as long again
        return cls(children, command, env=_environment(settings), role="worker",
                   stop_timeout=2 * w.stop_timeout + 5, clock=clock)  # fmt: skip

    @classmethod
    def gateways(
        cls, settings: QuotaflowSettings, processes: int, command: list[str]
    ) -> Supervisor:
        """``processes`` gateways sharing one port, each with a usage source and a journal of
        its own (``source-i``, ``journal_dir/gateway-i``)."""
        if processes < 1:
            raise ValueError("--processes must be at least 1")
        c = settings.client
        children = [
            Child(i, {"QUOTAFLOW_CLIENT__SOURCE": f"{c.source}-{i}",
                      "QUOTAFLOW_CLIENT__JOURNAL_DIR": str(Path(c.journal_dir) / f"gateway-{i}")})
            for i in range(processes)
        ]  # fmt: skip
        # in-flight calls get the gateway's own shutdown; usage is flushed within 10 s
        return cls(children, command, env=_environment(settings), role="gateway",
                   stop_timeout=15.0)  # fmt: skip

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(
            self.command, env={**self._env, **child.env}, preexec_fn=_die_with_parent
        )
        child.started_at = self.clock()
        child.restart_at = None
        where = f", web port {child.web_port}" if child.web_port is not None else ""
        log.info("%s %d started (pid %d%s)", self.role, child.index, child.process.pid, where)

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
            log.warning("%s %d (pid %d) exited with status %s after %.0f s; restarting in "
                        "%.0f s", self.role, child.index, process.pid, status, ran,
                        child.backoff)  # fmt: skip

    def stop(self) -> int:
        """SIGTERM every child, wait for their saves, kill stragglers; the exit status."""
        self.stopping.set()
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        worst = 0
        for child in running:
            assert child.process is not None
            try:
                status = child.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.process.kill()
                status = child.process.wait()
                log.error("%s %d (pid %d) did not stop in time: killed", self.role,
                          child.index, child.process.pid)  # fmt: skip
            child.exits.append(status)
            verdict = "saved" if status == 0 else "stopped without saving" if status == 3 else (
                f"status {status}"
            )  # fmt: skip
            log.info("%s %d (pid %d) stopped: %s", self.role, child.index, child.process.pid,
                     verdict)  # fmt: skip
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


def _environment(settings: QuotaflowSettings) -> dict[str, str]:
    """The children's environment: the supervisor's, with its settings spelled out (so a
    setting given on the command line reaches them too)."""
    return {**os.environ, **settings.to_env()}


def _die_with_parent() -> None:
    """In a child, before it runs: on Linux, have the kernel send it SIGTERM if the supervisor
    dies (even by SIGKILL), so no worker or gateway outlives it unsupervised."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
