"""What the dashboard shows, computed from quota states (pure: no I/O, clock injected).

One summary a tick: every key's usage against its limits (budgets in dollars), current
throttles with their wait, the top consumers of the last minute, the top spenders of the last
day, the fleet's spend, the split by model, and the worker's own figures. Money is summed in
integer micro-dollars and shown as exact dollar strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quotaflow.decision import is_money_limit
from quotaflow.state import QuotaState
from quotaflow.stats import percentile
from quotaflow.units import COST, dollars
from quotaflow.windows import DAY, MINUTE

#: Keys listed in a summary (the busiest first); the JSON API lists them all.
TOP_KEYS = 50


def key_row(state: QuotaState, now: float) -> dict[str, Any]:
    """One key as the API and the dashboard show it."""
    windows = state.scopes.get("", {})
    minute, day = windows.get(MINUTE), windows.get(DAY)
    t = state.totals
    return {
        "key": state.key,
        "policy": state.scope_policies.get(""),
        "throttled": state.throttled,
        "denied_by": state.denied_by,
        # limits of shadow-mode policies at their ceiling: would throttle, do not
        "shadow": list(state.shadow),
        "retry_after": _retry_after(state, now),
        "limits": [
            {
                "name": lim.name if not lim.scope else f"{lim.scope}/{lim.name}",
                "limit": lim.limit,
                "used": lim.used,
                "remaining": lim.remaining,
                "percent": round(100 * lim.used / lim.limit, 1) if lim.limit else 0.0,
                "reset_at": lim.reset_at,
                # a budget: its figures are micro-dollars, shown in dollars
                "money": is_money_limit(lim.name),
            }
            for lim in state.limits
        ],
        "spend": {
            "last_minute_micros": minute[1 + COST] if minute else 0,
            "last_day_micros": day[1 + COST] if day else 0,
            "total_micros": t.cost_micros,
            "last_day_usd": dollars(day[1 + COST] if day else 0),
            "total_usd": dollars(t.cost_micros),
        },
        "last_minute": {
            "requests": minute[1] if minute else 0,
            "tokens": minute[2] + minute[3] if minute else 0,
        },
        "totals": {
            "records": t.records,
            "requests": t.requests,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
        },
        "instances": state.instances,
        "published_at": state.published_at,
    }


def _retry_after(state: QuotaState, now: float) -> float:
    if not state.throttled:
        return 0.0
    waited = now - state.published_at
    return round(max(state.retry_after - waited, 0.0), 1)


def summary(
    states: Sequence[QuotaState],
    now: float,
    worker: dict[str, Any],
    latencies_ms: Sequence[float] = (),
    top: int = TOP_KEYS,
) -> dict[str, Any]:
    """The dashboard's whole view at ``now``."""
    rows = [key_row(s, now) for s in states]
    rows.sort(key=lambda r: (-max((x["percent"] for x in r["limits"]), default=0.0), r["key"]))
    models: dict[str, dict[str, int]] = {}
    for s in states:
        for model, t in s.models.items():
            m = models.setdefault(model, {"requests": 0, "tokens": 0})
            m["requests"] += t.requests
            m["tokens"] += t.tokens
    consumers = sorted(rows, key=lambda r: (-r["last_minute"]["tokens"], r["key"]))
    spenders = sorted(rows, key=lambda r: (-r["spend"]["last_day_micros"], r["key"]))
    minute_spend = sum(r["spend"]["last_minute_micros"] for r in rows)
    day_spend = sum(r["spend"]["last_day_micros"] for r in rows)
    return {
        "now": now,
        "keys": rows[:top],
        "key_count": len(rows),
        "throttled": [
            {"key": r["key"], "denied_by": r["denied_by"], "retry_after": r["retry_after"]}
            for r in rows
            if r["throttled"]
        ],
        # keys a shadow-mode policy would throttle (a limit being rolled out)
        "shadow": [{"key": r["key"], "limits": r["shadow"]} for r in rows if r["shadow"]],
        "top_consumers": [
            {"key": r["key"], **r["last_minute"]}
            for r in consumers[:10]
            if r["last_minute"]["tokens"]
        ],
        "top_spenders": [
            {
                "key": r["key"],
                "last_day_usd": r["spend"]["last_day_usd"],
                "total_usd": r["spend"]["total_usd"],
            }
            for r in spenders[:10]
            if r["spend"]["last_day_micros"]
        ],
        "spend": {"last_minute_usd": dollars(minute_spend), "last_day_usd": dollars(day_spend)},
        "models": dict(sorted(models.items(), key=lambda kv: -kv[1]["tokens"])),
        "decision_latency_ms": {
            "p50": _rounded(percentile(latencies_ms, 50)),
            "p99": _rounded(percentile(latencies_ms, 99)),
            "count": len(latencies_ms),
        },
        "worker": worker,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
