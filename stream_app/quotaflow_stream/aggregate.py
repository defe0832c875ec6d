"""Per-key aggregation: folding usage records into their keys' entries (pure functions).

One entry per counter key (:mod:`quotaflow_stream.entry` draws its shape) holds the
sliding-window buckets of every scope (key-wide and, where a policy asks, per model), what each
emitting instance sent lately, lifetime totals, and the ids it has counted
(:mod:`quotaflow_stream.dedup`). Per record only the minute window's 0.125 s bucket changes; the
hour and day windows are filled from minute buckets as those leave the minute window (see
:func:`prune`); readers add the minute buckets not rolled up yet.

Bucket arithmetic is :mod:`quotaflow.windows`'s, inlined in the fold (a few microseconds a
record); ``tests/unit/test_window_contract.py`` holds each inlined copy to the reference.

A source's "recent requests" decays with a half-life of :data:`RATE_HALF_LIFE` seconds of event
time; budget shares are drawn from it (see :mod:`quotaflow_stream.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from quotaflow.record import WireRecord
from quotaflow.units import WIDTH
from quotaflow.windows import DAY, HOUR, MINUTE, bucket_size, month_period, months_of
from quotaflow_stream.dedup import (
    DEDUP_HORIZON,
    ID_MASK,
    ID_WINDOW,
    foreign_seen,
    forget_ids,
    sdk_id_match,
    sdk_seen_before,
)
from quotaflow_stream.entry import (
    STRIDE,
    TOTALS,
    Entry,
    InstanceIds,
    SourceSeen,
    Windows,
    add_bucket,
    new_entry,
    source_ts,
)

# The fold adds a record's measures to its minute bucket inline, one statement each, in the
# order of quotaflow.units.MEASURES: a measure added there is added here too.
assert WIDTH == 6, "fold_records adds each measure inline"
assert TOTALS == 9, "fold_records adds each total inline"

#: Every scope keeps these windows, whatever its policy limits, so dashboards can show them.
WINDOW_SIZES: tuple[int, ...] = (MINUTE, HOUR, DAY)

#: (table field, window length, bucket length) for each window, precomputed for the hot loop.
WINDOWS: tuple[tuple[str, int, float], ...] = tuple(
    (str(size), size, bucket_size(size)) for size in WINDOW_SIZES
)
MINUTE_FIELD, _MINUTE_BUCKET = str(MINUTE), bucket_size(MINUTE)
#: The longer windows, whose buckets are filled from minute buckets as those roll out.
_COARSE = WINDOWS[1:]

#: Sources silent for this long (event time) are forgotten.
SOURCE_HORIZON = 3600.0

#: Half-life (event-time seconds) of a source's recent-request weight.
RATE_HALF_LIFE = 10.0

ScopesFor = Callable[[str, str], Iterable[str]]


#: Seconds between prunes of one entry (expired buckets, silent sources, old ids): pruning
#: walks the whole entry, so it runs when due rather than on every batch; readers skip buckets
#: that no longer count, so a bucket kept a little longer changes no figure.
PRUNE_EVERY = 5.0


def add_records(
    entry: Entry | None,
    records: Iterable[WireRecord],
    scopes_for: ScopesFor,
    grace: float,
    horizon: float = DEDUP_HORIZON,
    now: float | None = None,
) -> tuple[Entry, int]:
    """Fold records of one key into its entry, in place; returns (entry, records late for a
    window). See :func:`fold_records`, which this applies to a single key."""
    records = list(records)
    if not records:
        return (new_entry() if entry is None else entry), 0
    entries = {} if entry is None else {records[0].key: entry}
    late, _ = fold_records(entries, records, scopes_for, grace, horizon, now)
    return entries[records[0].key], late


def fold_records(
    entries: dict[str, Entry],
    records: Iterable[WireRecord],
    scopes_for: ScopesFor,
    grace: float,
    horizon: float = DEDUP_HORIZON,
    now: float | None = None,
    touched: set[str] | None = None,
    load: Callable[[str], Entry | None] | None = None,
    price: Callable[[WireRecord], int | None] | None = None,
    zones: tuple[str, ...] = (),
) -> tuple[int, int]:
    """Fold records of any keys into their entries (created where missing), in place; returns
    (records late for a window, duplicates dropped), and adds each key it saw to ``touched``.
    A key missing from ``entries`` is looked up with ``load`` (the saved entry) before it is
    started afresh. The caller persists the entries (the worker saves them to a changelog).

    ``scopes_for(key, model)`` names the scopes a record counts in (always ``""``, plus the model
    where a model policy binds it). A record whose bucket no longer counts in a window at the
    key's watermark, even allowing ``grace`` seconds, is left out of that window but still counts
    in the others and in the totals, and is reported as late. A duplicate (an id that arrived
    within ``horizon`` seconds before ``now``, the worker's clock; event time if not given) is
    not counted at all; ``entry["dup"]`` counts them. Arrival time, not event time, bounds the
    horizon, so replaying an old log twice still counts it once.

    Each record's cost (``cost_micros``) adds to the lifetime totals; a record without one is
    priced with ``price`` (:meth:`~quotaflow.prices.PriceTable.record_cost`), 0 if unpriced.
    ``zones`` are the time zones whose billing months each scope counts (see :func:`prune`).
    """
    # In place, record by record in message order, every lookup hoisted: this loop is the
    # worker's hot path (a few microseconds a record). Grouping a message by key first, or
    # copying a busy key's buckets, cost more than the folding itself.
    late_total = dup_total = 0
    sdk_seen, foreign = sdk_seen_before, foreign_seen
    sdk_id = sdk_id_match
    # scopes that do not depend on the record (no model policy): no call per record
    constant_scopes: tuple[str, ...] | None = getattr(scopes_for, "constant", None)
    mark = touched.add if touched is not None else None
    key = None
    e: Entry = {}
    ids: dict[str, InstanceIds] = {}
    models: dict[str, list[int]] = {}
    scopes: dict[str, Windows] = {}
    totals: list[int] = []
    src: dict[str, SourceSeen] = {}
    for r in records:
        if r.key != key:
            key = r.key
            found = entries.get(key)
            if found is None:
                found = load(key) if load is not None else None
                entries[key] = found = new_entry() if found is None else found
            e = found
            ids = e["ids"]
            models = e["m"]
            scopes = e["s"]
            totals = e["t"]
            src = e["src"]
        ts = r.ts
        if mark is not None:
            # duplicates too: an entry whose records all come again may hold changes that were
            # never saved (a failed save before a rebalance); touching it saves them now
            mark(key)
        arrived = ts if now is None else now
        m = sdk_id(r.id)
        if m is None:
            duplicate = foreign(e.setdefault("xid", {}), r.id, arrived)
        else:
            # dedup.sdk_seen inline for the common cases: an instance's first record on this
            # key, or one newer than its newest here.
            prefix: str = m[1]
            counter = int(m[2], 16)
            seen = ids.get(prefix)
            duplicate = False
            if seen is None:
                ids[prefix] = (counter, 1, arrived)
            elif counter > seen[0]:
                shift = counter - seen[0]
                ids[prefix] = (
                    counter,
                    ((seen[1] << shift) | 1) & ID_MASK if shift < ID_WINDOW else 1,
                    arrived if arrived > seen[2] else seen[2],
                )
            else:
                duplicate = sdk_seen(ids, prefix, seen, counter, arrived)
        if duplicate:
            e["dup"] = e.get("dup", 0) + 1
            dup_total += 1
            continue
        wm = e["wm"]
        if ts > wm:
            e["wm"] = wm = ts
        req, pt, ct = r.requests, r.prompt_tokens, r.completion_tokens
        cached, images = r.cached_prompt_tokens, r.images
        cost = r.cost_micros
        if cost is None:  # a v1 record, or one its producer could not price
            cost = (price(r) or 0) if price is not None else 0
        write, reasoning = r.cache_write_tokens, r.reasoning_tokens
        totals[0] += 1
        totals[1] += req
        totals[2] += pt
        totals[3] += ct
        totals[4] += cost
        # the units most calls do not bill (cache reads and writes, reasoning, images) are
        # added only where a call has them: zero adds would be a fifth of the fold
        billed_more = cached or write or reasoning or images
        if billed_more:
            totals[5] += cached
            totals[6] += write
            totals[7] += reasoning
            totals[8] += images
        sums = models.get(r.model)
        if sums is None:
            models[r.model] = [1, req, pt, ct, cost, cached, write, reasoning, images]
        else:
            sums[0] += 1
            sums[1] += req
            sums[2] += pt
            sums[3] += ct
            sums[4] += cost
            if billed_more:
                sums[5] += cached
                sums[6] += write
                sums[7] += reasoning
                sums[8] += images
        was = src.get(r.source)
        src[r.source] = (
            (ts, float(req))
            if was is None
            else (ts, was[1] * 0.5 ** ((ts - was[0]) / RATE_HALF_LIFE) + req)
            if ts > was[0]
            else (was[0], was[1] + req)
        )
        # Only the minute window per record: its 0.125 s buckets roll up into the hour and
        # day windows when they leave it (prune), so a busy key's longer windows cost one
        # update per bucket rather than per record. A record too late for the minute window
        # goes to the longer ones directly.
        start = (ts // _MINUTE_BUCKET) * _MINUTE_BUCKET
        minute_late = start + _MINUTE_LATE + grace <= wm
        was_late = minute_late
        for scope in constant_scopes or scopes_for(key, r.model):
            windows = scopes.get(scope)
            if windows is None:
                windows = scopes[scope] = {}
            if minute_late:
                usage = (req, pt, ct, cached, images, cost)
                was_late = _add_coarse(windows, ts, usage, wm, grace, zones) or was_late
                continue
            buckets = windows.get(MINUTE_FIELD)
            if not buckets:
                windows[MINUTE_FIELD] = [start, req, pt, ct, cached, images, cost]
            elif buckets[-STRIDE] == start:
                buckets[-6] += req
                buckets[-5] += pt
                buckets[-4] += ct
                if billed_more:
                    buckets[-3] += cached
                    buckets[-2] += images
                buckets[-1] += cost
            elif buckets[-STRIDE] < start:
                buckets += (start, req, pt, ct, cached, images, cost)
            else:  # an older bucket: records arrive mostly in order, so this is rare
                add_bucket(buckets, start, (req, pt, ct, cached, images, cost))
        if was_late:
            late_total += 1
            e["late"] += 1
        prune_at = e.get("pa")
        if prune_at is None:  # a new entry: nothing to prune yet
            e["pa"] = wm + PRUNE_EVERY
        elif wm >= prune_at:
            prune(e, grace, horizon, now, zones)
            e["pa"] = wm + PRUNE_EVERY
    return late_total, dup_total


#: A minute bucket beginning at ``start`` has left the minute window once the watermark reaches
#: ``start + _MINUTE_LATE`` (plus grace).
_MINUTE_LATE = MINUTE + _MINUTE_BUCKET


def _add_coarse(
    windows: dict[str, list[float]],
    ts: float,
    usage: Sequence[float],
    wm: float,
    grace: float,
    zones: tuple[str, ...] = (),
) -> bool:
    """Add ``usage`` (every measure) at ``ts`` to the hour and day windows; True if it was too
    late for one. Too late for the day window, it goes to its billing months directly."""
    late = False
    for field, size, b in _COARSE:
        start = (ts // b) * b
        if start + size + b + grace <= wm:
            late = True
            if size == DAY and zones:
                _add_to_months(windows, start, usage, zones)
            continue
        buckets = windows.get(field)
        if buckets is None:
            windows[field] = [start, *usage]
        else:
            add_bucket(buckets, start, usage)
    return late


def month_field(zone: str) -> str:
    """The field of a scope's windows that keeps its billing months in ``zone``."""
    return f"mo:{zone}"


def _roll_into_months(
    windows: Windows, day: list[float], k: int, zones: tuple[str, ...], stale_before: float
) -> None:
    """Add the day buckets ``day[:k]`` to the billing months they fall in, in each zone; drop
    the months that ended before ``stale_before`` (nothing reads or adds to them any more)."""
    for i in range(0, k, STRIDE):
        _add_to_months(windows, day[i], day[i + 1 : i + STRIDE], zones)
    for zone in zones:
        flat = windows.get(month_field(zone))
        while flat and month_period(flat[0], zone)[1] < stale_before:
            del flat[:STRIDE]


def _add_to_months(
    windows: Windows, start: float, usage: Sequence[float], zones: tuple[str, ...]
) -> None:
    """Add the usage of a day bucket beginning at ``start`` to its billing month in each zone."""
    for zone in zones:
        field = month_field(zone)
        flat = windows.get(field)
        if flat is None:
            flat = windows[field] = []
        add_bucket(flat, months_of(zone)(start)[0], usage)


def prune(
    entry: Entry,
    grace: float,
    horizon: float = DEDUP_HORIZON,
    now: float | None = None,
    zones: tuple[str, ...] = (),
) -> None:
    """Drop buckets that no longer count (allowing ``grace``), long-silent sources, and ids
    that arrived longer than the dedup ``horizon`` before ``now`` (default: the watermark).

    Day buckets leaving the day window roll into each scope's billing months, one flat bucket
    per month begun (``mo:<zone>``, for each of ``zones``): a month's usage is its rolled
    buckets plus the day and minute buckets since it began (see
    :func:`quotaflow_stream.evaluate.month_counts`). Day buckets are 15 minutes long, and every
    time zone's midnight falls on a quarter hour, so none straddles a month's start."""
    wm = entry["wm"]
    for windows in entry["s"].values():
        minute = windows.get(MINUTE_FIELD)
        if minute and minute[0] + _MINUTE_LATE + grace <= wm:
            # minute buckets leaving the minute window roll up into the longer windows
            k, n = 0, len(minute)
            while k < n and minute[k] + _MINUTE_LATE + grace <= wm:
                _add_coarse(windows, minute[k], minute[k + 1 : k + STRIDE], wm, grace, zones)
                k += STRIDE
            del minute[:k]
        for field, size, b in _COARSE:
            buckets = windows.get(field)
            if buckets and buckets[0] + size + b + grace <= wm:
                k, n = 0, len(buckets)
                while k < n and buckets[k] + size + b + grace <= wm:
                    k += STRIDE
                if size == DAY and zones:
                    _roll_into_months(windows, buckets, k, zones, wm - size - grace)
                del buckets[:k]
    src = entry["src"]
    for source in [s for s, seen in src.items() if source_ts(seen) < wm - SOURCE_HORIZON]:
        del src[source]
    forget_ids(entry, (wm if now is None else now) - horizon)
