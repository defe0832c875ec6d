"""Turn a key's aggregate into its published quota state under the policies (pure)."""

from __future__ import annotations

import math
from typing import Any

from quotaflow.policies import KEY_SCOPE, UNIT_INDEX, PolicySet
from quotaflow.state import (
    EXPIRIES,
    STATE_EXPIRIES,
    Expiry,
    LimitStatus,
    QuotaState,
    Totals,
    WindowCounts,
)
from quotaflow.units import WIDTH, unit_value
from quotaflow.windows import (
    DAY,
    MINUTE,
    MONTH,
    bucket_expires_at,
    bucket_size,
    bucket_start,
    frees_at,
    month_period,
    months_of,
)
from quotaflow_stream.aggregate import (
    MINUTE_FIELD,
    RATE_HALF_LIFE,
    WINDOW_SIZES,
    ScopesFor,
    month_field,
)
from quotaflow_stream.entry import STRIDE, Buckets, Entry, first_at_or_after, source_ts

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
        # a model binding, if any, comes last
        return (KEY_SCOPE, model) if bindings and bindings[-1].scope != KEY_SCOPE else key_only

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
    shadow: list[str] = []  # limits of shadow-mode policies (enforce: false) at their ceiling
    for scope in entry["s"]:
        bindings = policies.resolve(key, None if scope == KEY_SCOPE else scope)
        binding = next((b for b in bindings if b.scope == scope), None)
        # expiries only where a limit reads them, and only as many as a state carries: they
        # are most of a state's size and of its cost. A throttled limit reads them all (when
        # it frees may lie beyond the first few): drawn again for it alone.
        limited = binding.windows if binding else ()
        pending = minute_sums(entry, scope)
        windows = scopes[scope] = {
            size: sliding_counts(
                entry, scope, size, now, STATE_EXPIRIES[size] if size in limited else 0, pending
            )
            for size in WINDOW_SIZES
        }
        if MONTH in limited:
            assert binding is not None
            windows[MONTH] = month_counts(entry, scope, binding.policy.timezone, now)
        if binding is None:
            continue
        scope_policies[scope] = binding.policy.name
        every_expiry: dict[int, tuple[Expiry, ...]] = {}
        for spec in binding.policy.specs:
            w = windows[spec.window]
            unit = UNIT_INDEX[spec.unit]
            used = unit_value(unit, w, 1)
            if spec.window == MONTH:
                reset_at = month_period(now, binding.policy.timezone)[1]
            elif used < spec.limit:  # when all its current usage has freed
                expiries = w[EXPIRIES]
                if len(expiries) < STATE_EXPIRIES[spec.window]:  # all of them
                    reset_at = float(expiries[-1][0]) if expiries else now
                else:
                    reset_at = max(newest_expiry(entry, scope, spec.window), now)
            else:  # when it next admits a call
                expiries = w[EXPIRIES]
                if len(expiries) == STATE_EXPIRIES[spec.window]:  # perhaps not all of them
                    expiries = every_expiry.get(spec.window, ())
                    if not expiries:
                        drawn = sliding_counts(entry, scope, spec.window, now, 1 << 30, pending)
                        expiries = every_expiry[spec.window] = drawn[EXPIRIES]
                everything = float(expiries[-1][0]) if expiries else now
                frees = ((x[0], unit_value(unit, x, 1)) for x in expiries)
                reset_at = frees_at(used, spec.limit - 1, frees, now, everything)
            status = LimitStatus(
                scope=scope,
                name=spec.name,
                limit=spec.limit,
                used=used,
                remaining=max(spec.limit - used, 0),
                reset_at=reset_at,
            )
            limits.append(status)
            if status.remaining == 0 and not binding.policy.enforce:
                shadow.append(status.name if scope == KEY_SCOPE else f"{scope}/{status.name}")
            elif status.remaining == 0 and (denied is None or status.reset_at > denied.reset_at):
                denied = status
    sources = entry["src"]
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
        shadow=tuple(shadow),
        denied_by=None
        if denied is None
        else (denied.name if denied.scope == KEY_SCOPE else f"{denied.scope}/{denied.name}"),
        retry_after=0.0 if denied is None else max(denied.reset_at - now, 0.0),
        sources={s: source_ts(seen) for s, seen in sources.items()},
        instances=len(shares),
        shares=shares,
        totals=Totals(*t),
        models={m: Totals(*sums) for m, sums in entry.get("m", {}).items()},
    )


def newest_expiry(entry: Entry, scope: str, size: int) -> float:
    """When the newest bucket of a window of ``scope`` frees (0 if it has none): all its
    usage has freed by then. The minute buckets not rolled up yet count in every window."""
    windows = entry["s"].get(scope)
    if not windows:
        return 0.0
    newest = [flat[-STRIDE] for flat in (windows.get(str(size)), windows.get(MINUTE_FIELD)) if flat]
    return bucket_expires_at(bucket_start(max(newest), size), size) if newest else 0.0


#: A window's sliding count with nothing in it: its bucket start goes in front.
_NOTHING = (0,) * WIDTH


def minute_sums(entry: Entry, scope: str) -> list[float] | None:
    """Each measure summed over every minute bucket of ``scope`` (those not rolled up into the
    longer windows yet), or None if it has none: every window's count includes them, so a
    publication sums them once (see :func:`sliding_counts`)."""
    windows = entry["s"].get(scope)
    minute = windows.get(MINUTE_FIELD) if windows else None
    if not minute:
        return None
    return [sum(minute[m::STRIDE]) for m in range(1, STRIDE)]


def sliding_counts(
    entry: Entry,
    scope: str,
    size: int,
    now: float,
    max_expiries: int,
    pending: list[float] | None = None,
) -> WindowCounts:
    """The sliding count of one window at ``now``, and when its usage frees.

    Returns ``(bucket_start, *measures, expiries)`` (a :data:`~quotaflow.state.WindowCounts`):
    the start of the bucket holding ``now``, each measure summed over every bucket that counts
    at ``now``, and the first ``max_expiries`` of those buckets as ``(expires_at, *measures)``,
    oldest first, so a reader can subtract what has freed since ``now``. The hour and day
    windows include the minute buckets not rolled up into them yet. ``pending``, if given, is
    :func:`minute_sums` of the same entry and scope, taken instead of summing again.
    """
    # Every published state reads every window of every scope, so this runs for each key on
    # each publication: buckets are in start order, so a binary search finds the first that
    # counts and slices sum the rest in C.
    # quotaflow.windows' bucket_start, sliding_floor and bucket_expires_at, inlined (held to
    # them by tests/unit/test_window_contract.py)
    b = bucket_size(size)
    current = (now // b) * b
    floor = current - size  # a multiple of b: buckets starting at or after it count
    windows = entry["s"].get(scope)
    if not windows:
        return (current, *_NOTHING, ())
    buckets: Any = windows.get(str(size), ())
    minute: Any = windows.get(MINUTE_FIELD) if size != MINUTE else None
    if minute and max_expiries:
        # expiries of the coarse buckets the minute buckets will roll into: merge them
        buckets = _merged(buckets, minute, b)
        minute = None
    i = first_at_or_after(buckets, floor)
    if pending is not None and size == MINUTE:
        # every minute bucket less the few (not rolled up yet) that left the minute window
        sums = list(pending)
        for k in range(0, i, STRIDE):
            for m in range(1, STRIDE):
                sums[m - 1] -= buckets[k + m]
    else:
        sums = [sum(buckets[i + m :: STRIDE]) for m in range(1, STRIDE)]
    if minute:  # minute buckets start at or after the coarse bucket they roll into
        j = first_at_or_after(minute, floor)
        if j == 0 and pending is not None:  # all of them count, as they almost always do
            sums = [total + more for total, more in zip(sums, pending, strict=True)]
        else:
            sums = [total + sum(minute[j + m :: STRIDE]) for m, total in enumerate(sums, 1)]
    lasting = size + b  # a bucket's start to its expiry
    expiries = tuple(
        (float(buckets[k]) + lasting, *map(int, buckets[k + 1 : k + STRIDE]))
        for k in range(i, min(len(buckets), i + STRIDE * max_expiries), STRIDE)
    )
    return (current, *map(int, sums), expiries)


def month_counts(entry: Entry, scope: str, zone: str, now: float) -> WindowCounts:
    """The billing month's count at ``now`` in ``zone``: ``(month_start, *measures, ())``,
    the day buckets rolled into it (see :func:`~quotaflow_stream.aggregate.prune`) plus the
    day and minute buckets since it began. A month does not slide: nothing in it expires."""
    start = months_of(zone)(now)[0]
    windows = entry["s"].get(scope)
    sums = [0.0] * WIDTH
    if windows:
        rolled = windows.get(month_field(zone))
        for flat in (rolled, windows.get(str(DAY)), windows.get(MINUTE_FIELD)):
            if flat:
                i = first_at_or_after(flat, start)
                if flat is rolled:  # only the month that began at start
                    if i >= len(flat) or flat[i] != start:
                        continue
                    end = i + STRIDE
                else:
                    end = len(flat)
                for m in range(WIDTH):
                    sums[m] += sum(flat[i + 1 + m : end : STRIDE])
    return (start, *map(int, sums), ())


def _merged(coarse: Buckets, minute: Buckets, b: float) -> Buckets:
    """Coarse flat buckets with the minute buckets added into the coarse buckets of length
    ``b`` they fall in, in start order."""
    merged: dict[float, list[float]] = {}
    for flat in (coarse, minute):
        for i in range(0, len(flat), STRIDE):
            start = (flat[i] // b) * b
            sums = merged.get(start)
            if sums is None:
                merged[start] = [start, *flat[i + 1 : i + STRIDE]]
            else:
                for m in range(1, STRIDE):
                    sums[m] += flat[i + m]
    return [x for bk in sorted(merged.values()) for x in bk]
