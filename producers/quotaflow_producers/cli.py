"""``quotaflow demo`` and ``quotaflow simulate``."""

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
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_simulate)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _cmd_simulate(args: argparse.Namespace) -> int:
    from quotaflow_producers.simulate import run_simulate_command

    return run_simulate_command(
        instances=args.instances, keys_per_arm=args.keys, load=args.load,
        duration=args.duration, rpm=args.rpm, tpm=args.tpm, seed=args.seed, as_json=args.json,
    )  # fmt: skip


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
