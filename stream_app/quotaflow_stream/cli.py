"""``quotaflow worker`` and ``quotaflow dev up|down|status``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from quotaflow.settings import dev_state_path, load_settings


def register_worker(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a stream worker (Faust)")
    p.add_argument("--web-port", type=int, help="web port (default: settings, 6066)")
    p.add_argument("--loglevel", default="info", choices=["crit", "error", "warn", "info", "debug"])
    p.add_argument(
        "--processes", type=int, default=1, metavar="N",
        help="run N workers (one core each) in one consumer group under a supervisor that "
        "restarts them and stops them cleanly; worker i listens on web port + i",
    )  # fmt: skip
    p.set_defaults(func=_cmd_worker)


def _cmd_worker(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.web_port is not None:
        settings.worker.web_port = args.web_port
    if args.processes != 1:
        from quotaflow_stream.supervisor import Supervisor

        try:
            supervisor = Supervisor.workers(settings, args.processes, loglevel=args.loglevel)
        except ValueError as exc:
            raise SystemExit(f"quotaflow worker: {exc}") from None
        return supervisor.run()
    from quotaflow_stream.worker import run_worker

    run_worker(settings, loglevel=args.loglevel)
    return 0


def register_topics(sub: Any) -> None:
    p = sub.add_parser(
        "topics", help="create the topics (partitions, retention, compaction) if missing"
    )
    p.add_argument("action", choices=["create"], help="create what is missing; keep what exists")
    p.set_defaults(func=_cmd_topics)


def _cmd_topics(args: argparse.Namespace) -> int:
    from quotaflow_stream.topics import ensure_topics

    settings = load_settings()
    for name, partitions in ensure_topics(settings).items():
        print(f"{name}: {partitions} partitions")
    return 0


def register_doctor(sub: Any) -> None:
    p = sub.add_parser(
        "doctor", help="check broker, topics, Redis, consumer lag and clocks; print fixes"
    )
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per check (5)")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from quotaflow_stream.doctor import as_json, render, run_checks

    checks = run_checks(load_settings(), timeout=args.timeout)
    print(as_json(checks) if args.json else render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def register_dev(sub: Any) -> None:
    p = sub.add_parser("dev", help="the embedded broker and Redis for local use")
    dev = p.add_subparsers(dest="dev_command", metavar="ACTION")
    dev.required = True
    dev.add_parser("up", help="start Tansu and Valkey on free loopback ports, create topics")
    dev.add_parser("down", help="stop them")
    dev.add_parser("status", help="show what runs where")
    p.set_defaults(func=_cmd_dev)


def _cmd_dev(args: argparse.Namespace) -> int:
    from quotaflow_stream.harness import (
        read_state,
        stack_alive,
        start_stack,
        stop_stack,
        write_state,
    )
    from quotaflow_stream.topics import ensure_topics

    path = dev_state_path()
    stack = read_state(path)
    if args.dev_command == "status":
        if stack is None:
            print(json.dumps({"running": False, "state_file": str(path)}))
            return 1
        alive = stack_alive(stack)
        print(json.dumps({"running": alive, "state_file": str(path), **vars(stack)}, indent=2))
        return 0 if alive else 1
    if args.dev_command == "down":
        if stack is None:
            print("quotaflow dev: nothing running")
            return 0
        stop_stack(stack)
        path.unlink(missing_ok=True)
        print("quotaflow dev: stopped")
        return 0
    if stack is not None and stack_alive(stack):
        print(f"quotaflow dev: already up (kafka {stack.kafka_bootstrap}, redis {stack.redis_url})")
        return 0
    stack = start_stack(path.parent / "dev-logs")
    write_state(path, stack)
    settings = load_settings()
    ensure_topics(settings)
    print(f"quotaflow dev: up — kafka {stack.kafka_bootstrap}, redis {stack.redis_url}")
    print(f"state in {path}; stop with: quotaflow dev down")
    return 0
