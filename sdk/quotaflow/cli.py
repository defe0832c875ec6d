"""The ``quotaflow`` command.

Built-in sub-commands need only the SDK. Others (``worker``, ``dev``, ``demo``...) are plugged in
by the role packages through the ``quotaflow.commands`` entry-point group; each entry point is a
``register(subparsers)`` function that adds its parser and sets ``func`` on it. A role whose extra
is not installed shows up with a clear install hint instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from quotaflow._exceptions import QuotaflowError

Register = Callable[[Any], None]


def _cmd_policies_check(args: argparse.Namespace) -> int:
    from quotaflow.policies import load_policies

    policies = load_policies(args.file)
    for p in policies.policies:
        target = "default" if p.default else ", ".join(p.keys)
        models = f" models={','.join(p.models)}" if p.models else ""
        limits = ", ".join(f"{s.name}={s.show(s.limit)}" for s in p.specs)
        print(f"{p.name}: keys={target}{models} fail_mode={p.fail_mode} [{limits}]")
    print(f"{args.file}: {len(policies)} policies OK")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from quotaflow.record import usage_record_json_schema

    print(json.dumps(usage_record_json_schema(), indent=2, sort_keys=True))
    return 0


def _cmd_key_id(args: argparse.Namespace) -> int:
    import os

    from quotaflow.keys import key_id
    from quotaflow.settings import load_settings

    salt = os.environ.get(args.salt_env) if args.salt_env else None
    salt = salt or load_settings().gateway.key_salt.get_secret_value()
    for line in sys.stdin:
        secret = line.strip()
        if secret:
            print(key_id(secret, salt))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quotaflow", description="Streaming quota enforcement for LLM usage."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pol = sub.add_parser("policies", help="validate, apply and follow the live policies")
    pol_sub = pol.add_subparsers(dest="policies_command", metavar="ACTION")
    pol_sub.required = True
    chk = pol_sub.add_parser("check", help="validate FILE and list its policies")
    chk.add_argument("file")
    chk.set_defaults(func=_cmd_policies_check)
    from quotaflow import policies_cli

    policies_cli.register(pol_sub)
    policies_cli.register_limits(sub)

    kid = sub.add_parser(
        "key-id", help="print the counter id of each API key read from stdin (for policies)"
    )
    kid.add_argument(
        "--salt-env", help="environment variable holding the salt (default: gateway.key_salt)"
    )
    kid.set_defaults(func=_cmd_key_id)

    schema = sub.add_parser("schema", help="print the usage record v1 JSON Schema")
    schema.set_defaults(func=_cmd_schema)

    for ep in sorted(entry_points(group="quotaflow.commands"), key=lambda e: e.name):
        try:
            register: Register = ep.load()
        except ImportError as exc:
            _register_missing(sub, ep.name, exc)
            continue
        register(sub)
    return parser


def _register_missing(sub: Any, name: str, exc: ImportError) -> None:
    def unavailable(args: argparse.Namespace) -> int:
        print(
            f"quotaflow {name}: not available ({exc}); install the role's extra, "
            f"e.g. pip install 'quotaflow[all]'",
            file=sys.stderr,
        )
        return 2

    p = sub.add_parser(name, help=f"(unavailable: {exc.name or exc})")
    p.set_defaults(func=unavailable)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except QuotaflowError as exc:
        print(f"quotaflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
