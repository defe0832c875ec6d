"""``quotaflow policies apply|get|history|rollback``: the live policy document on the policies
topic (``policies check`` validates a file offline, in :mod:`quotaflow.cli`)."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

from quotaflow._exceptions import QuotaflowError
from quotaflow._yaml import Missing, read_yaml
from quotaflow.policies import PolicySet, load_policies, parse_limits
from quotaflow.policy_log import Override, PolicyVersion, diff


def register(pol_sub: Any) -> None:
    apply = pol_sub.add_parser(
        "apply", help="publish FILE as the next live policy version (prints the diff first)"
    )
    apply.add_argument("file", type=Path)
    apply.add_argument("--dry-run", action="store_true", help="print the diff, publish nothing")
    apply.add_argument("--message", "-m", default="", help="why (kept in the history)")
    apply.add_argument(
        "--expect-version", type=int, help="refuse unless the live version is still N"
    )
    apply.add_argument("--author", help="who applies (default: user@host)")
    apply.set_defaults(func=_cmd_apply)
    get = pol_sub.add_parser("get", help="print the live policy document (or version N)")
    get.add_argument("--version", type=int)
    get.add_argument("--format", choices=("yaml", "json"), default="yaml")
    get.set_defaults(func=_cmd_get)
    history = pol_sub.add_parser("history", help="every version: who, when, why, what changed")
    history.add_argument("--json", action="store_true", help="print JSON lines")
    history.set_defaults(func=_cmd_history)
    rollback = pol_sub.add_parser("rollback", help="publish version N's document again")
    rollback.add_argument("version", type=int)
    rollback.add_argument("--message", "-m", default="")
    rollback.add_argument("--author")
    rollback.set_defaults(func=_cmd_rollback)


def _settings() -> Any:
    from quotaflow.settings import load_settings

    return load_settings()


def _author(given: str | None) -> str:
    return given or f"{getpass.getuser()}@{socket.gethostname()}"


def _cmd_apply(args: argparse.Namespace) -> int:
    from quotaflow.policy_topic import publish, read_log

    new = load_policies(args.file)  # today's errors, naming file, path and field
    try:
        document = read_yaml(args.file, "policy file")
    except Missing:
        raise QuotaflowError(f"{args.file}: policy file not found") from None
    settings = _settings()
    live = read_log(settings).current
    if live is not None:
        changes, base = diff(live.policies, new), f"version {live.version}"
    else:  # the file is what the fleet enforces until a version is published
        try:
            in_force: PolicySet | None = load_policies(settings.policies_file)
        except QuotaflowError:
            in_force = None
        changes = diff(in_force, new)
        base = f"{settings.policies_file} (no live version yet)"
    print(f"against {base}:")
    print("\n".join(f"  {line}" for line in changes) or "  no changes")
    if args.dry_run:
        return 0
    if not changes and live is not None:
        print("nothing to apply")
        return 0
    expect = args.expect_version if args.expect_version is not None else (
        live.version if live is not None else 0
    )  # fmt: skip
    written = publish(settings, document, author=_author(args.author), message=args.message,
                      expect_version=expect)  # fmt: skip
    print(f"published version {written.version} ({written.hash})")
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    from quotaflow.policy_topic import read_log

    found = read_log(_settings())
    version = found.current if args.version is None else found.versions.get(args.version)
    if version is None:
        raise QuotaflowError(
            "no live policy version published yet" if args.version is None
            else f"no policy version {args.version} (known: {sorted(found.versions)})"
        )  # fmt: skip
    if args.format == "json":
        print(json.dumps(version.document, indent=2))
    else:
        import yaml

        print(f"# policy version {version.version} by {version.author}: {version.message}")
        print(yaml.safe_dump(version.document, sort_keys=False), end="")
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from quotaflow.policy_topic import read_log

    found = read_log(_settings())
    previous: PolicyVersion | None = None
    for number in sorted(found.versions):
        version = found.versions[number]
        changes = diff(previous.policies if previous is not None else None, version.policies)
        previous = version
        if args.json:
            print(json.dumps({**version.summary(), "changes": changes}))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(version.time))
        print(f"{number:>4}  {when}Z  {version.author}  {version.message or '-'}")
        for line in changes:
            print(f"        {line}")
    for o in found.override_history:
        what = "cleared" if o.limits is None else f"set {o.limits}"
        if args.json:
            print(json.dumps({"override": o.key, "model": o.model, "limits": o.limits,
                              "expires_at": o.expires_at, "reason": o.reason,
                              "author": o.author, "time": o.time}))  # fmt: skip
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(o.time))
            print(f"override  {when}Z  {o.author}  {o.key}: {what}  {o.reason or '-'}")
    for refusal in found.refused:
        print(f"refused: {refusal}")
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from quotaflow.policy_topic import publish, read_log

    settings = _settings()
    found = read_log(settings)
    target, live = found.versions.get(args.version), found.current
    if target is None or live is None:
        raise QuotaflowError(f"no policy version {args.version} (known: {sorted(found.versions)})")
    for line in diff(live.policies, target.policies):
        print(f"  {line}")
    message = args.message or f"rollback to version {args.version}"
    written = publish(settings, target.document, author=_author(args.author), message=message,
                      expect_version=live.version)  # fmt: skip
    print(f"published version {written.version}: the document of version {args.version}")
    return 0


# -- quotaflow limits: temporary overrides ----------------------------------------------------


def register_limits(sub: Any) -> None:
    lim = sub.add_parser("limits", help="temporary per-key limit overrides (boost or clamp)")
    lim_sub = lim.add_subparsers(dest="limits_command", metavar="ACTION")
    lim_sub.required = True
    put = lim_sub.add_parser("set", help="override limits of KEY: LIMIT=VALUE ...")
    put.add_argument("key")
    put.add_argument("limits", nargs="+", metavar="LIMIT=VALUE",
                     help="e.g. tokens_per_minute=200000 cost_per_day=50.00")  # fmt: skip
    put.add_argument("--model", help="override the model policy's limits for this model")
    put.add_argument("--ttl", help="expire after this long (90s, 30m, 2h, 1d; default never)")
    put.add_argument("--reason", default="", help="why (kept on the topic)")
    put.add_argument("--author")
    put.set_defaults(func=_cmd_limits_set)
    clear = lim_sub.add_parser("clear", help="remove KEY's override (before it expires)")
    clear.add_argument("key")
    clear.add_argument("--model")
    clear.add_argument("--reason", default="")
    clear.add_argument("--author")
    clear.set_defaults(func=_cmd_limits_clear)
    show = lim_sub.add_parser("list", help="the overrides in force")
    show.add_argument("--json", action="store_true", help="print JSON lines")
    show.set_defaults(func=_cmd_limits_list)


_TTL_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``2h``, ``1d`` or ``1h30m``; raises QuotaflowError."""
    parts = _TTL_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise QuotaflowError(f"--ttl {text!r}: expected a duration like 90s, 30m, 2h or 1h30m")
    seconds = sum(float(n) * _TTL_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise QuotaflowError(f"--ttl {text!r}: must be longer than 0")
    return seconds


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``LIMIT=VALUE`` pairs as a limits mapping, validated like a policy's (names the field)."""
    import yaml

    limits: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise QuotaflowError(f"{item!r}: expected LIMIT=VALUE, e.g. tokens_per_minute=200000")
        limits[name] = yaml.safe_load(value)
    parse_limits(limits, "override")  # raises ConfigError naming the limit
    return limits


def _publish_override(override: Override) -> None:
    from quotaflow.policy_topic import publish_override

    publish_override(_settings(), override)


def _cmd_limits_set(args: argparse.Namespace) -> int:
    limits = parse_assignments(args.limits)
    now = time.time()
    expires = now + parse_ttl(args.ttl) if args.ttl else None
    _publish_override(Override(args.key, args.model, limits, expires, args.reason,
                               _author(args.author), now))  # fmt: skip
    until = _when(expires) if expires is not None else "until cleared"
    scope = f" (model {args.model})" if args.model else ""
    print(f"override of {args.key}{scope}: {limits}, {until}")
    return 0


def _cmd_limits_clear(args: argparse.Namespace) -> int:
    _publish_override(Override(args.key, args.model, None, None, args.reason,
                               _author(args.author), time.time()))  # fmt: skip
    print(f"override of {args.key} cleared")
    return 0


def _cmd_limits_list(args: argparse.Namespace) -> int:
    from quotaflow.policy_topic import read_log

    found = read_log(_settings())
    now = time.time()
    for (key, model), o in sorted(found.overrides.items(), key=lambda kv: kv[0][0]):
        if not o.active(now):
            continue
        row = {"key": key, "model": model, "limits": o.limits, "expires_at": o.expires_at,
               "reason": o.reason, "author": o.author, "set_at": o.time}  # fmt: skip
        if args.json:
            print(json.dumps(row))
        else:
            until = _when(o.expires_at) if o.expires_at is not None else "until cleared"
            scope = f" model={model}" if model else ""
            print(f"{key}{scope}: {o.limits} {until}; {o.reason or '-'} ({o.author})")
    return 0


def _when(at: float) -> str:
    return "until " + time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))
