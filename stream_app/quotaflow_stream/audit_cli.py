"""``quotaflow audit query | totals | export | reconcile``: the usage topic as an audit trail."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from quotaflow._exceptions import ConfigError
from quotaflow.prices import dollars, load_price_table
from quotaflow.settings import QuotaflowSettings, load_settings
from quotaflow_stream import audit


def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="query, total, export and reconcile the usage audit trail")
    cmds = p.add_subparsers(dest="audit_command", required=True)

    q = cmds.add_parser("query", help="records of one key in a time range")
    q.add_argument("--key", required=True)
    _range(q)
    q.add_argument("--model", default=None)
    q.add_argument("--format", choices=("table", "csv", "jsonl"), default="table")
    q.add_argument("--limit", type=int, default=None, help="at most this many rows")
    q.set_defaults(func=_query)

    t = cmds.add_parser(
        "totals", help="every unit and the cost, grouped by key, model... per window"
    )
    t.add_argument(
        "--by", default="key,model", help=f"comma list of {', '.join(audit.GROUP_FIELDS)}"
    )
    t.add_argument("--window", choices=tuple(audit.WINDOWS), default=None)
    _range(t)
    t.add_argument("--format", choices=("table", "csv", "jsonl"), default="table")
    t.set_defaults(func=_totals)

    e = cmds.add_parser("export", help="every record (once per id) to CSV, JSONL or Parquet")
    e.add_argument("--to", required=True, help="file; .csv, .jsonl or .parquet picks the format")
    e.add_argument("--format", choices=("csv", "jsonl", "parquet"), default=None)
    e.add_argument("--key", default=None)
    _range(e, end="--until")
    e.set_defaults(func=_export)

    r = cmds.add_parser(
        "reconcile", help="recount the topic and compare with the worker and the snapshot"
    )
    r.add_argument("--worker", default=None, help="worker API base URL (default from settings)")
    r.add_argument("--no-worker", action="store_true", help="compare with the snapshot only")
    r.add_argument(
        "--settle", type=float, default=5.0,
        help="seconds to let the pipeline catch up before a difference counts (5)",
    )  # fmt: skip
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_reconcile)


def _range(p: argparse.ArgumentParser, end: str = "--to") -> None:
    p.add_argument("--from", dest="since", default=None, help="ISO 8601, epoch, or 15m, 2h, 1d ago")
    p.add_argument(end, dest="until", default=None, help="end of the range (exclusive)")


def _settings() -> QuotaflowSettings:
    return load_settings()


def _progress(enabled: bool) -> tuple[AbstractContextManager[Any], audit.Progress | None]:
    """A progress bar on stderr for long scans (hidden when stderr is not a terminal)."""
    if not enabled:
        return nullcontext(), None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("reading the usage topic"), BarColumn(), MofNCompleteColumn(),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip
    task = bar.add_task("scan", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _scan(args: argparse.Namespace, settings: QuotaflowSettings, stats: audit.ScanStats) -> Any:
    since = audit.parse_time(args.since) if args.since else None
    until = audit.parse_time(args.until) if args.until else None
    bar, update = _progress(sys.stderr.isatty())
    with bar:
        records = list(audit.scan_usage(settings, stats, update))
    return audit.matching(
        records, key=getattr(args, "key", None), model=getattr(args, "model", None),
        since=since, until=until,
    )  # fmt: skip


def _query(args: argparse.Namespace) -> int:
    settings = _settings()
    stats = audit.ScanStats()
    prices = load_price_table(settings.prices_file)
    rows = [audit.row(r, prices) for r in _scan(args, settings, stats)]
    rows.sort(key=lambda r: r["ts"])
    if args.limit is not None:
        rows = rows[: args.limit]
    _emit(rows, audit.COLUMNS, args.format, f"usage of {args.key}")
    _summary(stats, f"{len(rows)} records")
    return 0


def _totals(args: argparse.Namespace) -> int:
    by = tuple(f.strip() for f in args.by.split(",") if f.strip())
    bad = [f for f in by if f not in audit.GROUP_FIELDS]
    if bad or not by:
        raise ConfigError(f"--by: unknown field {bad[0] if bad else '(none)'!r}; "
                          f"use {', '.join(audit.GROUP_FIELDS)}")  # fmt: skip
    settings = _settings()
    stats = audit.ScanStats()
    prices = load_price_table(settings.prices_file)
    sums = audit.totals(_scan(args, settings, stats), by, args.window, prices)
    columns = (("window",) if args.window else ()) + by + audit.TOTALS + ("tokens", "cost_usd")
    rows = []
    for group, s in sorted(sums.items()):
        cost = s[audit.TOTALS.index("cost_micros")]
        row = dict(zip(columns, (*group, *s, s[2] + s[3], dollars(cost)), strict=True))
        rows.append(row)
    _emit(rows, columns, args.format, "usage totals")
    _summary(stats, f"{len(rows)} groups")
    return 0


def _export(args: argparse.Namespace) -> int:
    path = Path(args.to)
    fmt = args.format or path.suffix.lstrip(".").lower()
    if fmt not in ("csv", "jsonl", "parquet"):
        raise ConfigError(f"--to {path}: cannot tell the format; add --format csv|jsonl|parquet")
    settings = _settings()
    stats = audit.ScanStats()
    prices = load_price_table(settings.prices_file)
    rows = sorted(
        (audit.row(r, prices) for r in _scan(args, settings, stats)), key=lambda r: r["ts"]
    )
    if fmt == "parquet":
        n = audit.write_parquet(rows, str(path), audit.COLUMNS)
    else:
        with open(path, "w", encoding="utf-8", newline="") as out:
            n = audit.write_rows(rows, fmt, out, audit.COLUMNS)
    _summary(stats, f"{n} records written to {path}")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    settings = _settings()
    stats = audit.ScanStats()
    bar, update = _progress(sys.stderr.isatty())
    with bar:
        recount = audit.totals(
            audit.scan_usage(settings, stats, update), ("key",), None,
            load_price_table(settings.prices_file),
        )  # fmt: skip
    by_key = {group[0]: sums for group, sums in recount.items()}
    base = args.worker or f"http://{settings.worker.web_host}:{settings.worker.web_port}"
    deadline = time.monotonic() + args.settle
    while True:
        diffs = audit.compare(by_key, audit.snapshot_totals(settings), "snapshot")
        if not args.no_worker:
            diffs += audit.compare(
                by_key, audit.worker_totals(base, by_key, settings.worker.api_headers()), "worker"
            )
        if not diffs or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    report = {
        "keys": len(by_key),
        "scan": stats.as_dict(),
        "compared_with": ["snapshot"] + ([] if args.no_worker else [base]),
        "differences": [vars(d) for d in diffs],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for d in diffs:
            print(d)
        print(
            f"reconcile: {len(by_key)} keys, {stats.records} records "
            f"({stats.duplicates} duplicates, {stats.invalid} invalid, {stats.future} future "
            f"left out): {len(diffs)} differences"
        )
    return 1 if diffs else 0


def _emit(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str, title: str) -> None:
    if fmt == "table":
        sys.stdout.write(audit.render_table(rows, columns, title))
    else:
        audit.write_rows(rows, fmt, sys.stdout, columns)


def _summary(stats: audit.ScanStats, what: str) -> None:
    print(
        f"{what}; scanned {stats.messages} messages, {stats.records} unique records, "
        f"{stats.duplicates} duplicates left out",
        file=sys.stderr,
    )
