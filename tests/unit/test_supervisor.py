"""The worker supervisor with stand-in children (real processes that only sleep): restarts with
backoff, a clean stop, and what a child that will not stop gets. (With real workers:
tests/e2e/test_worker_processes.py.)"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from quotaflow.settings import load_settings
from quotaflow_stream.supervisor import HEALTHY_AFTER, Child, Supervisor
from tests.support import wait_for

#: A child that runs until SIGTERM, then exits 0 (a worker that saved); with IGNORE set in its
#: environment it ignores SIGTERM, like a worker stuck in its save.
CHILD = [sys.executable, "-c", (
    "import os, signal, sys, time\n"
    "if os.environ.get('IGNORE'): signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "else: signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "os.makedirs(os.environ['QUOTAFLOW_WORKER__DATA_DIR'], exist_ok=True)\n"
    "open(os.path.join(os.environ['QUOTAFLOW_WORKER__DATA_DIR'], 'ready'), 'w')"
    ".write(str(os.getpid()))\n"
    "time.sleep(120)\n"
)]  # fmt: skip


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def ready(sup: Supervisor) -> None:
    """Wait until every child has set up its signal handling (it then says so in a file)."""

    def started(c: Child) -> bool:  # this incarnation, not an earlier one of a restarted child
        path = data_dir(c) / "ready"
        return c.process is not None and path.exists() and path.read_text() == str(c.process.pid)

    wait_for(lambda: all(started(c) for c in sup.children), 10, what="the children to start")


def data_dir(child: Child) -> Path:
    return Path(child.env["QUOTAFLOW_WORKER__DATA_DIR"])


def supervisor(tmp_path: Path, n: int, clock: Clock, **worker: object) -> Supervisor:
    settings = load_settings(worker={"web_port": 7100, "data_dir": str(tmp_path), **worker})
    return Supervisor.workers(settings, n, command=CHILD, clock=clock)


def test_children_get_ports_and_dirs_of_their_own_and_a_crashed_one_is_restarted(
    tmp_path: Path,
) -> None:
    clock = Clock()
    sup = supervisor(tmp_path, 2, clock).start()
    try:
        assert [c.web_port for c in sup.children] == [7100, 7101]
        assert [data_dir(c).name for c in sup.children] == ["worker-0", "worker-1"]
        first = sup.children[0]
        assert first.process is not None
        old_pid = first.process.pid
        os.kill(old_pid, signal.SIGKILL)
        first.process.wait()
        sup.watch_once()
        assert first.exits == [-signal.SIGKILL] and first.restart_at == clock.now + 1.0
        sup.watch_once()
        assert first.process.pid == old_pid, "not before its backoff"
        clock.now += 1.0
        sup.watch_once()
        assert first.process.pid != old_pid and first.restarts == 1
        # crashing again soon doubles the wait; after a healthy run it is immediate again
        first.process.kill()
        first.process.wait()
        sup.watch_once()
        assert first.backoff == 2.0
        clock.now += 2.0
        sup.watch_once()
        clock.now += HEALTHY_AFTER
        first.process.kill()
        first.process.wait()
        sup.watch_once()
        assert first.backoff == 0.0 and first.restart_at == clock.now
        sup.watch_once()
        assert first.restarts == 3
        ready(sup)
        assert sup.stop() == 0, "every child saved"
        assert all(c.process is not None and c.process.poll() == 0 for c in sup.children)
        assert [c.describe()["alive"] for c in sup.children] == [False, False]
    finally:
        for c in sup.children:
            if c.process is not None and c.process.poll() is None:
                c.process.kill()


def test_a_child_that_does_not_stop_is_killed_and_the_status_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IGNORE", "1")
    sup = supervisor(tmp_path, 1, Clock(), stop_timeout=0.2).start()
    ready(sup)
    assert sup.stop() == 1
    (child,) = sup.children
    assert child.process is not None and child.process.returncode == -signal.SIGKILL


def test_bad_process_counts_and_ports_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        supervisor(tmp_path, 0, Clock())
    with pytest.raises(ValueError, match="fixed web port"):
        supervisor(tmp_path, 2, Clock(), web_port=0)


def test_children_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    """SIGKILL to the supervisor (an OOM kill, a crash) must not leave workers running
    unsupervised: the kernel sends each child SIGTERM."""
    import subprocess

    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from quotaflow.settings import load_settings\n"
        "from quotaflow_stream.supervisor import Supervisor\n"
        f"settings = load_settings(worker={{'web_port': 7200, 'data_dir': {str(tmp_path)!r}}})\n"
        f"sup = Supervisor.workers(settings, 2, command={CHILD!r}).start()\n"
        "print(' '.join(str(c.process.pid) for c in sup.children), flush=True)\n"
        "import time; time.sleep(120)\n"
    )
    sup = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert sup.stdout is not None
    pids = [int(p) for p in sup.stdout.readline().split()]
    assert len(pids) == 2
    sup.kill()
    sup.wait()

    def gone() -> bool:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        # reaped by init once they exit; a zombie counts as gone
        return not [
            p
            for p in alive
            if Path(f"/proc/{p}/stat").exists()
            and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
        ]

    wait_for(gone, 10, what="the children to stop with their supervisor")
