"""``quotaflow demo``: the whole pipeline on the embedded stack, with a live terminal view.

It reuses a running ``quotaflow dev up`` stack or starts a private one (stopped at the end),
runs a worker on topics of its own (so earlier runs never blur the totals), drives simulated
traffic from several SDK instances against the example policies, and at the end checks that
what the worker aggregated equals what the instances sent.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quotaflow.client import QuotaClient
from quotaflow.policies import load_policies
from quotaflow.settings import QuotaflowSettings
from quotaflow.state import QuotaState
from quotaflow_producers.traffic import DEFAULT_PROFILES, KeyTally, TrafficInstance
from quotaflow_stream.harness import DevStack, WorkerProcess, embedded_run
from quotaflow_stream.topics import ensure_topics


def _sum_tallies(instances: list[TrafficInstance]) -> dict[str, KeyTally]:
    out: dict[str, KeyTally] = {}
    for inst in instances:
        for key, tally in inst.report.tallies.items():
            out.setdefault(key, KeyTally()).add(tally)
    return out


def _aggregated(state: QuotaState | None) -> dict[str, int]:
    t = state.totals if state else None
    return {
        "records": t.records if t else 0,
        "requests": t.requests if t else 0,
        "prompt_tokens": t.prompt_tokens if t else 0,
        "completion_tokens": t.completion_tokens if t else 0,
    }


def _matches(sent: KeyTally, agg: dict[str, int]) -> bool:
    return (
        sent.records == agg["records"]
        and sent.requests == agg["requests"]
        and sent.prompt_tokens == agg["prompt_tokens"]
        and sent.completion_tokens == agg["completion_tokens"]
    )


def _live_table(observer: QuotaClient, tallies: dict[str, KeyTally], elapsed: float) -> Any:
    from rich.table import Table

    table = Table(title=f"quotaflow demo — {elapsed:5.1f}s — per-key usage (fleet view)")
    for col in ("key", "policy", "requests/min", "tokens/min", "throttle", "sent", "denied"):
        table.add_column(col)
    for key in sorted(tallies):
        state = observer.cache.state(key)
        limits = {(lim.scope, lim.name): lim for lim in state.limits} if state else {}

        def cell(name: str, limits: dict[Any, Any] = limits) -> str:
            lim = limits.get(("", name))
            if lim is None:
                return "-"
            pct = lim.used / lim.limit
            color = "red" if pct >= 1 else "yellow" if pct >= 0.8 else "green"
            return f"[{color}]{lim.used}/{lim.limit}[/{color}]"

        tokens = cell("tokens_per_minute")
        if tokens == "-":
            tokens = cell("prompt_tokens_per_minute")
        throttle = _throttle_cell(state)
        policy = state.scope_policies.get("", "-") if state else "-"
        t = tallies[key]
        table.add_row(
            key,
            policy,
            cell("requests_per_minute"),
            tokens,
            throttle,
            str(t.records),
            str(t.denied),
        )
    return table


def _throttle_cell(state: QuotaState | None) -> str:
    """Throttled (with the wait), near a limit (denying the larger calls), or open."""
    if state is None:
        return "-"
    if state.throttled:
        return f"[red]{state.denied_by} {state.retry_after:.0f}s[/red]"
    fullest = max(state.limits, key=lambda lim: lim.used / lim.limit, default=None)
    if fullest is not None and fullest.used >= 0.9 * fullest.limit:
        name = fullest.name if not fullest.scope else f"{fullest.scope}/{fullest.name}"
        return f"[yellow]near {name} {100 * fullest.used // fullest.limit}%[/yellow]"
    return "[green]open[/green]"


def run_demo(
    duration: float | None, instances: int, rate: float, as_json: bool, seed: int | None = None
) -> int:
    with embedded_run("demo") as (stack, settings, run_dir):
        summary = _demo(stack, settings, run_dir, duration, instances, rate, as_json, seed)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0 if summary["totals_match"] else 1


def _demo(
    stack: DevStack,
    settings: QuotaflowSettings,
    run_dir: Path,
    duration: float | None,
    instances: int,
    rate: float,
    as_json: bool,
    seed: int | None,
) -> dict[str, Any]:
    policies = load_policies(settings.policies_file)
    ensure_topics(settings)
    worker = WorkerProcess(settings, run_dir / "worker.log", loglevel="warn").start()
    say = (lambda *a: print(*a, file=sys.stderr)) if as_json else print
    say(f"quotaflow demo: kafka {stack.kafka_bootstrap}, redis {stack.redis_url}")
    say(f"dashboard {worker.base_url}/  (API {worker.base_url}/api/keys), logs in {run_dir}")
    fleet: list[TrafficInstance] = []
    observer = QuotaClient(settings, policies=policies)
    try:
        worker.wait_ready(90)
        observer.open()
        observer.wait_ready(30)
        fleet = [
            TrafficInstance(
                settings,
                policies,
                f"demo-{run_dir.name}-{i}",
                rate,
                seed=None if seed is None else seed + i,
            )
            for i in range(instances)
        ]
        for inst in fleet:
            inst.open()
        started = time.monotonic()
        for inst in fleet:
            inst.start()
        _run_until(duration, started, observer, fleet, live=not as_json)
        for inst in fleet:
            inst.stop()
        for inst in fleet:
            inst.join()
            inst.close()
        sent = _sum_tallies(fleet)
        matched = _wait_for_totals(observer, sent, timeout=30.0)
        return _summary(
            settings, worker, observer, fleet, sent, matched, time.monotonic() - started
        )
    finally:
        for inst in fleet:
            if inst.client.state.value == "opened":
                inst.close()
        observer.close()
        worker.stop()


def _run_until(
    duration: float | None,
    started: float,
    observer: QuotaClient,
    fleet: list[TrafficInstance],
    live: bool,
) -> None:
    def done() -> bool:
        return duration is not None and time.monotonic() - started >= duration

    try:
        if not live:
            while not done():
                time.sleep(0.1)
            return
        from rich.live import Live

        with Live(refresh_per_second=4, transient=False) as view:
            while not done():
                view.update(_live_table(observer, _sum_tallies(fleet), time.monotonic() - started))
                time.sleep(0.25)
    except KeyboardInterrupt:
        pass


def _wait_for_totals(observer: QuotaClient, sent: dict[str, KeyTally], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if all(_matches(t, _aggregated(observer.cache.state(k))) for k, t in sent.items()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _summary(
    settings: QuotaflowSettings,
    worker: WorkerProcess,
    observer: QuotaClient,
    fleet: list[TrafficInstance],
    sent: dict[str, KeyTally],
    matched: bool,
    elapsed: float,
) -> dict[str, Any]:
    stats = worker.stats() or {}
    keys: dict[str, dict[str, Any]] = {}
    for key, tally in sorted(sent.items()):
        state = observer.cache.state(key)
        keys[key] = {
            "sent": asdict(tally),
            "aggregated": _aggregated(state),
            "throttled": bool(state and state.throttled),
            "limits": [lim.to_dict() for lim in state.limits] if state else [],
        }
    return {
        "duration_s": round(elapsed, 2),
        "instances": len(fleet),
        "records_sent": sum(t.records for t in sent.values()),
        "records_aggregated": sum(k["aggregated"]["records"] for k in keys.values()),
        "states_published": stats.get("states_published"),
        "denials": sum(t.denied for t in sent.values()),
        "dlq": stats.get("dlq"),
        "undelivered": sum(i.report.undelivered for i in fleet),
        "decisions_by_reason": dict(sum((i.report.reasons for i in fleet), Counter())),
        "totals_match": matched,
        "keys": keys,
    }


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="quotaflow demo — totals (sent by the SDKs vs aggregated by the worker)")
    for col in ("key", "sent records", "aggregated", "tokens sent", "tokens aggregated", "denied"):
        table.add_column(col)
    for key, k in summary["keys"].items():
        s, a = k["sent"], k["aggregated"]
        table.add_row(
            key,
            str(s["records"]),
            str(a["records"]),
            str(s["prompt_tokens"] + s["completion_tokens"]),
            str(a["prompt_tokens"] + a["completion_tokens"]),
            str(s["denied"]),
        )
    console = Console()
    console.print()
    console.print(table)
    verdict = "[green]match[/green]" if summary["totals_match"] else "[red]MISMATCH[/red]"
    console.print(
        f"records sent {summary['records_sent']}, aggregated {summary['records_aggregated']}, "
        f"states published {summary['states_published']}, denials {summary['denials']}: {verdict}"
    )


DEFAULT_KEYS = [p.key for p in DEFAULT_PROFILES]
