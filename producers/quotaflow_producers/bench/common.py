"""What the benches share: a run on the embedded stack with a roomy policy, and progress."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import DevStack, embedded_run, run_settings

#: Limits no bench reaches: every call is admitted, so figures measure the path, not denials.
POLICY = """
version: 1
policies:
  - {name: bench, default: true, max_staleness: 3600,
     limits: {requests_per_minute: 100000000, tokens_per_minute: 1000000000}}
"""


@contextmanager
def bench_run(kind: str) -> Iterator[tuple[DevStack, QuotaflowSettings, Path]]:
    """:func:`~quotaflow_stream.harness.embedded_run` with :data:`POLICY` in force."""
    with embedded_run(kind) as (stack, settings, run_dir):
        settings.policies_file = run_dir / "policies.yaml"
        settings.policies_file.write_text(POLICY)
        yield stack, settings, run_dir


def more_settings(
    stack: DevStack, run_dir: Path, label: str, like: QuotaflowSettings
) -> QuotaflowSettings:
    """Settings for another pipeline of the same run (topics and app id of its own)."""
    settings = run_settings(stack, run_dir, f"{like.worker.app_id}-{label}")
    settings.policies_file = like.policies_file
    return settings


def progress(quiet: bool) -> Callable[[str], None]:
    """A printer of progress lines to stderr (stdout is the JSON), silent with ``--json``."""

    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr)

    return say


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, seconds) a process and every process below it have used so far,
    from Linux's ``/proc``; 0.0 where it cannot be read. On a machine whose cores are shared by
    the load generator, the upstream and the broker, a process's requests per CPU second is its
    own cost, apart from what the others take."""
    total = 0.0
    todo = [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        current = todo.pop()
        try:
            # the fields after the command's name, which may itself hold spaces and parentheses
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total
