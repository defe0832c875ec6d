"""The benches' CPU accounting: a process and everything below it, from Linux's /proc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from quotaflow_producers.bench.common import cpu_seconds

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's /proc")


def test_cpu_seconds_counts_the_processes_below_a_process() -> None:
    """A child that burns half a second of CPU while this process sleeps: this process's
    figure rises by it (a gateway's supervisor is measured with its gateways)."""
    before = cpu_seconds(os.getpid())
    burner = subprocess.Popen(
        [sys.executable, "-c",
         "import time\nend = time.process_time() + 0.5\n"
         "while time.process_time() < end: pass\nprint('done', flush=True)\ntime.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert burner.stdout is not None and burner.stdout.readline().strip() == "done"
        used = cpu_seconds(os.getpid()) - before
        assert 0.5 <= used < 2.5, used  # the burn, the child's start-up, and this test's own
        assert cpu_seconds(burner.pid) >= 0.5
    finally:
        burner.kill()
        burner.wait()


def test_cpu_seconds_of_a_process_that_is_gone_is_zero() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert cpu_seconds(gone.pid) == 0.0
