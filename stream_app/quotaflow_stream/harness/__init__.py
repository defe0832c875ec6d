"""The development harness: what runs a whole pipeline on one machine.

The embedded stack (Tansu and Valkey from their wheels, on free loopback ports), settings for a
run of its own on it, and workers as child processes. The demo, the fleet simulator, the
benchmarks and the tests use it; production uses none of it (see ``docker-compose.yml``).
"""

from quotaflow_stream.harness.devstack import (
    DevStack,
    embedded_run,
    embedded_stack,
    free_port,
    read_state,
    run_settings,
    stack_alive,
    start_stack,
    stop_stack,
    wait_port,
    write_state,
)
from quotaflow_stream.harness.launcher import WorkerProcess
from quotaflow_stream.topics import ensure_topics

__all__ = [
    "DevStack",
    "WorkerProcess",
    "embedded_run",
    "embedded_stack",
    "ensure_topics",
    "free_port",
    "read_state",
    "run_settings",
    "stack_alive",
    "start_stack",
    "stop_stack",
    "wait_port",
    "write_state",
]
