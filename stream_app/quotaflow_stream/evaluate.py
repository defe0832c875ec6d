"""Turn a key's aggregate into its published quota state under the policies (pure)."""

from __future__ import annotations

from collections.abc import Iterable

from quotaflow.policies import KEY_SCOPE, PolicySet
from quotaflow.state import LimitStatus, QuotaState, Totals, WindowCounts
from quotaflow_stream.aggregate import WINDOW_SIZES, Entry, ScopesFor, current_bucket

#: A source counts as an active instance if it emitted within this many seconds (event time).
ACTIVE_SOURCE_SECONDS = 60.0


def scopes_for(policies: PolicySet) -> ScopesFor:
    """The scopes a record counts in: key-wide always, plus its model if a model policy binds."""

    def scopes(key: str, model: str) -> Iterable[str]:
        bindings = policies.resolve(key, model)
        if any(b.scope != KEY_SCOPE for b in bindings):
            return (KEY_SCOPE, model)
        return (KEY_SCOPE,)

    return scopes


def evaluate(key: str, entry: Entry, policies: PolicySet, now: float) -> QuotaState:
    """The state of ``key`` at ``now`` (worker clock): current windows, limits, throttle."""
    scopes: dict[str, dict[int, WindowCounts]] = {}
    scope_policies: dict[str, str] = {}
    limits: list[LimitStatus] = []
    denied: LimitStatus | None = None
    for scope in entry["s"]:
        windows = {size: current_bucket(entry, scope, size, now) for size in WINDOW_SIZES}
        scopes[scope] = windows
        bindings = policies.resolve(key, None if scope == KEY_SCOPE else scope)
        binding = next((b for b in bindings if b.scope == scope), None)
        if binding is None:
            continue
        scope_policies[scope] = binding.policy.name
        for spec in binding.policy.specs:
            start, req, pt, ct = windows[spec.window]
            used = {
                "requests": req,
                "prompt_tokens": pt,
                "completion_tokens": ct,
                "tokens": pt + ct,
            }[spec.dimension]
            status = LimitStatus(
                scope=scope,
                name=spec.name,
                limit=spec.limit,
                used=used,
                remaining=max(spec.limit - used, 0),
                reset_at=float(start + spec.window),
            )
            limits.append(status)
            if status.remaining == 0 and (denied is None or status.reset_at > denied.reset_at):
                denied = status
    sources: dict[str, float] = entry["src"]
    active = sum(1 for ts in sources.values() if ts >= entry["wm"] - ACTIVE_SOURCE_SECONDS)
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
        sources=dict(sources),
        instances=active,
        totals=Totals(records=t[0], requests=t[1], prompt_tokens=t[2], completion_tokens=t[3]),
    )
