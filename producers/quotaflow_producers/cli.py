"""``quotaflow demo``."""

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
