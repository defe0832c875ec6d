"""Turn a key's aggregate into its published quota state under the policies (pure)."""

from __future__ import annotations

import math
from typing import Any

from quotaflow.policies import DIMENSION_INDEX, KEY_SCOPE, PolicySet
from quotaflow.state import (
    STATE_EXPIRIES,
    LimitStatus,
    QuotaState,
    Totals,
    WindowCounts,
    of_dimension,
)
from quotaflow_stream.aggregate import (
    RATE_HALF_LIFE,
    WINDOW_SIZES,
    Entry,
    ScopesFor,
    sliding_counts,
    source_ts,
)

#: A source counts as an active instance if it emitted within this many seconds (event time).
ACTIVE_SOURCE_SECONDS = 60.0


#: Model names whose standing (named by a model policy or not) is remembered before the memo
#: starts afresh.
SCOPES_MEMO_SIZE = 200_000


def scopes_for(policies: PolicySet) -> ScopesFor:
    """The scopes a record counts in: key-wide always, plus its model if a model policy binds.

    Asked once per record, so answered from memos: a model no model policy names counts
    key-wide only whatever the key (most models, and every model when no policy names one);
    other pairs are resolved through the policy set's own memo."""
    model_policies = [p for p in policies.policies if p.models is not None]
    key_only = (KEY_SCOPE,)
    if not model_policies:

        def key_wide(key: str, model: str) -> tuple[str, ...]:
            return key_only

        # the fold reads this instead of calling once per record
        key_wide.constant = key_only  # type: ignore[attr-defined]
        return key_wide
    named: dict[str, bool] = {}

    def scopes(key: str, model: str) -> tuple[str, ...]:
        is_named = named.get(model)
        if is_named is None:
            if len(named) >= SCOPES_MEMO_SIZE:
                named.clear()
            is_named = named[model] = any(p.matches_model(model) for p in model_policies)
        if not is_named:
            return key_only
        # PolicySet.resolve remembers each (key, model) pair itself
        bindings = policies.resolve(key, model)
        return (KEY_SCOPE, model) if any(b.scope != KEY_SCOPE for b in bindings) else key_only

    return scopes


def budget_shares(entry: Entry) -> dict[str, float]:
    """Each active source's share of the key's remaining budget until the next state.

    Half is split evenly among the sources active in the last :data:`ACTIVE_SOURCE_SECONDS`
    and half in proportion to their recent request rate, so a busy instance gets more room
    than an idle one while every instance keeps some. Shares are rounded down: they sum to at
    most 1, which is what bounds the fleet's overshoot.
    """
    wm = entry["wm"]
    since = wm - ACTIVE_SOURCE_SECONDS
    # no call per source: a busy key has dozens and this runs on each publication of it
    active = [(s, seen) for s, seen in entry["src"].items() if seen[0] >= since]
    if not active:
        return {}
    even = 0.5 / len(active)
    # each weight decayed to the key's watermark, as the fold decays it to a newer record
    weights = [w * 0.5 ** ((wm - ts) / RATE_HALF_LIFE) if ts < wm else w for _, (ts, w) in active]
    total = sum(weights)
    return {
        s: math.floor((even + (0.5 * w / total if total > 0 else even)) * 10_000) / 10_000
        for (s, _), w in zip(active, weights, strict=True)
    }


def evaluate(key: str, entry: Entry, policies: PolicySet, now: float) -> QuotaState:
    """The state of ``key`` at ``now`` (worker clock): sliding windows, limits, throttle."""
    scopes: dict[str, dict[int, WindowCounts]] = {}
    scope_policies: dict[str, str] = {}
    limits: list[LimitStatus] = []
    denied: LimitStatus | None = None
    for scope in entry["s"]:
        bindings = policies.resolve(key, None if scope == KEY_SCOPE else scope)
        binding = next((b for b in bindings if b.scope == scope), None)
        # expiries only where a limit reads them (all of them: when a limit frees may lie
        # beyond the first few); they are most of a state's size, and of its cost
        limited = binding.windows if binding else ()
        full = {
            size: sliding_counts(entry, scope, size, now, 1 << 30 if size in limited else 0)
            for size in WINDOW_SIZES
        }
        scopes[scope] = {
            size: (*w[:4], w[4][:STATE_EXPIRIES]) if size in limited else w
            for size, w in full.items()
        }
        if binding is None:
            continue
        scope_policies[scope] = binding.policy.name
        for spec in binding.policy.specs:
            _, req, pt, ct, expiries = full[spec.window]
            dim = DIMENSION_INDEX[spec.dimension]
            used = of_dimension(dim, req, pt, ct)
            status = LimitStatus(
                scope=scope,
                name=spec.name,
                limit=spec.limit,
                used=used,
                remaining=max(spec.limit - used, 0),
                reset_at=_frees_at(used, spec.limit, dim, expiries, now),
            )
            limits.append(status)
            if status.remaining == 0 and (denied is None or status.reset_at > denied.reset_at):
                denied = status
    sources: dict[str, Any] = entry["src"]
    shares = budget_shares(entry)
    t = entry["t"]
    return QuotaState(
        key=key,
        published_at=now,
        watermark=entry["wm"],
        scopes=scopes,
        scope_policies=scope_policies,
        limits=tuple(limits),
        throttled=denied is not None,
        denied_by=None
        if denied is None
        else (denied.name if denied.scope == KEY_SCOPE else f"{denied.scope}/{denied.name}"),
        retry_after=0.0 if denied is None else max(denied.reset_at - now, 0.0),
        sources={s: source_ts(seen) for s, seen in sources.items()},
        instances=len(shares),
        shares=shares,
        totals=Totals(records=t[0], requests=t[1], prompt_tokens=t[2], completion_tokens=t[3]),
        models={m: Totals(*sums) for m, sums in entry.get("m", {}).items()},
    )


def _frees_at(
    used: int, limit: int, dim: int, expiries: tuple[tuple[float, int, int, int], ...], now: float
) -> float:
    """When a throttled limit next admits a call (usage drops below the limit), or, for one
    that is not throttled, when all its current usage has freed."""
    if used < limit:
        return float(expiries[-1][0]) if expiries else now
    for at, req, pt, ct in expiries:
        used -= of_dimension(dim, req, pt, ct)
        if used < limit:
            return float(at)
    return float(expiries[-1][0]) if expiries else now
