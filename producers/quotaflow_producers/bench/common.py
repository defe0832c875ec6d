"""What the benches share: a run on the embedded stack with a roomy policy, and progress."""

from __future__ import annotations

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
