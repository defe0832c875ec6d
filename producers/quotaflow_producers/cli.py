"""``quotaflow demo``, ``quotaflow simulate`` and ``quotaflow replay``."""

from __future__ import annotations

import argparse
from typing import Any


def register_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded stack (main job)")
    p.add_argument("--duration", type=_positive, default=None, help="seconds, then stop")
    p.add_argument("--instances", type=int, default=4, help="simulated SDK instances (4)")
    p.add_argument("--rate", type=_positive, default=15.0, help="calls/s per instance (15)")
    p.add_argument("--seed", type=int, default=None, help="seed the traffic mix")
    p.add_argument("--json", action="store_true", help="print a JSON summary, no live view")
    p.set_defaults(func=_cmd_demo)


def register_simulate(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="a fleet of SDK processes against the pipeline: overshoot, under-admission, "
        "propagation, with and without budget shares",
    )
    p.add_argument("--instances", type=_count, default=20, help="SDK processes (20)")
    p.add_argument(
        "--keys",
        type=_count,
        default=2,
        help="keys per arm, alternately bound by requests and by tokens (2); the run has an arm "
        "with budget shares and a baseline arm without",
    )
    p.add_argument("--load", type=_positive, default=5.0, help="offered load, x fair share (5)")
    p.add_argument("--duration", type=_positive, default=90.0, help="seconds of load (90)")
    p.add_argument("--rpm", type=_count, default=1200, help="requests/min limit per key (1200)")
    p.add_argument("--tpm", type=_count, default=800_000, help="tokens/min limit per key")
    p.add_argument("--seed", type=int, default=1, help="seed of the offered load (1)")
    p.add_argument(
        "--budget",
        type=_positive,
        default=None,
        help="dollars a minute: adds a key per arm bound by cost_per_minute (calls priced as "
        "gpt-4o-mini)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_simulate)


def register_replay(sub: Any) -> None:
    p = sub.add_parser("replay", help="import usage logs (JSONL or CSV) into the usage topic")
    p.add_argument("file", help="a .jsonl or .csv file of usage records")
    p.add_argument("--format", choices=("jsonl", "csv"), default=None, help="default: by suffix")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from quotaflow.settings import load_settings
    from quotaflow_producers.replay import replay

    settings = load_settings()
    columns = (SpinnerColumn(), TextColumn("replaying {task.completed} rows"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("replay", total=None)
        report = replay(
            settings, Path(args.file), args.format,
            progress=lambda n: bar.update(task, completed=n),
        )  # fmt: skip
    for problem in report.invalid:
        print(problem, file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(
            f"replay: {report.sent} of {report.rows} rows sent to {settings.topics.usage}, "
            f"{len(report.invalid)} invalid (skipped, listed above), "
            f"{report.undelivered} undelivered; {report.late_minute} too late for their minute "
            f"window and {report.late_all_windows} for every window (kept in the audit trail "
            "and the totals)"
        )
    return 1 if report.invalid or report.undelivered else 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _cmd_simulate(args: argparse.Namespace) -> int:
    from quotaflow_producers.simulate import SimulationPlan, run_simulate_command

    plan = SimulationPlan(
        instances=args.instances, keys_per_arm=args.keys, load=args.load,
        duration=args.duration, rpm=args.rpm, tpm=args.tpm, seed=args.seed, budget=args.budget,
    )  # fmt: skip
    return run_simulate_command(plan, args.json)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from quotaflow_producers.demo import run_demo

    if args.instances < 1:
        raise SystemExit("quotaflow demo: --instances must be >= 1")
    return run_demo(args.duration, args.instances, args.rate, args.json, args.seed)
