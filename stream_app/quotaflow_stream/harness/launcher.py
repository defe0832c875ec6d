"""Run stream workers as child processes (the demo and the tests do), configured by settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from quotaflow.settings import QuotaflowSettings


class WorkerProcess:
    """A ``quotaflow worker`` child with the given settings; its output goes to ``log_path``."""

    def __init__(self, settings: QuotaflowSettings, log_path: Path, loglevel: str = "info") -> None:
        self.settings = settings
        self.log_path = log_path
        self.loglevel = loglevel
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        w = self.settings.worker
        return f"http://{w.web_host}:{w.web_port}"

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "quotaflow", "worker", "--loglevel", self.loglevel],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def stats(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The worker's ``/api/stats``, or None if it does not answer."""
        request = urllib.request.Request(
            f"{self.base_url}/api/stats", headers=self.settings.worker.api_headers()
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return dict(json.loads(resp.read()))
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the worker has its partitions and has recovered its tables; raise with the
        log's tail if it died or took too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            stats = self.stats(timeout=0.5)
            if stats is not None and stats.get("ready"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout:g}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """``kill -9``: no shutdown at all, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
