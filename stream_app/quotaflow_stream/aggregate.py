"""Per-key aggregation: pure functions over a JSON-able dict (the table's value).

One entry per counter key holds the sliding-window buckets of every scope (key-wide and,
where a policy asks, per model), what each emitting instance sent lately, and lifetime totals.

Entry layout::

    {"wm": 1700000000.5,                      # newest event time of this key (its watermark)
     "s": {"": {"60": [start, req, prompt, completion, start, ...],     # 0.5 s buckets, flat
                "3600": [...], "86400": [...]}},                        # 30 s, 15 min buckets
     "src": {"svc-a-17": (1700000000.5, 3.2)}, # per source: newest event time, recent requests
     "t": [records, requests, prompt, completion],
     "m": {"gpt-4o": [records, requests, prompt, completion]},  # lifetime totals per model
     "late": 3,                                # records too late for at least one window
     "dup": 2,                                 # duplicate records dropped (same id)
     "ids": {"3f2a9c0d1e4b5a69": (6703, 65535, 1700000000.5)},  # newest, window, arrived
     "xid": {"gw-req-77": 1700000000.2},      # other ids: when each arrived
     "pa": 1700000005.5}                       # prune again once the watermark reaches this

Buckets lie flat, four numbers each in start order, and per-instance figures are tuples
replaced on update: a worker holds millions of these, and Python's cycle collector scans every
list it tracks (nested bucket lists cost a quarter of the worker's time in collections), while
a tuple of numbers is untracked once it survives a collection. Per-model totals, a few per key,
are lists updated in place: a fresh tuple per record was a third of what young collections
scanned. The hour and day windows are filled from minute buckets as those leave the minute
window (see :func:`prune`); readers add the minute buckets not rolled up yet.

Records count once: a record whose ``id`` the key has seen within the dedup horizon is dropped
(producer retries, redelivery after a worker restart, replayed logs). Ids in the SDK's format,
``<16 hex instance prefix>-<hex counter>``, cost a few bytes per instance: the newest counter
per instance and a 64-bit window below it (the anti-replay window of IPsec), which tolerates
records of one instance arriving up to 64 counter values out of order; a counter further behind
is taken as already counted. Other ids are remembered one by one (at most
:data:`MAX_FOREIGN_IDS` per key). Both are kept in the entry, so they are changelog-backed and
survive restarts like the counts.

A source's "recent requests" decays with a half-life of :data:`RATE_HALF_LIFE` seconds of event
time; budget shares are drawn from it (see :mod:`quotaflow_stream.evaluate`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from quotaflow.record import WireRecord
from quotaflow.windows import DAY, HOUR, MINUTE, bucket_size

#: Every scope keeps these windows, whatever its policy limits, so dashboards can show them.
WINDOW_SIZES: tuple[int, ...] = (MINUTE, HOUR, DAY)

#: (table field, window length, bucket length) for each window, precomputed for the hot loop.
_WINDOWS: tuple[tuple[str, int, float], ...] = tuple(
    (str(size), size, bucket_size(size)) for size in WINDOW_SIZES
)
_MINUTE_FIELD, _MINUTE_BUCKET = str(MINUTE), bucket_size(MINUTE)
_FIELD_OF = {size: field for field, size, _ in _WINDOWS}
#: The longer windows, whose buckets are filled from minute buckets as those roll out.
_COARSE = _WINDOWS[1:]

#: Sources silent for this long (event time) are forgotten.
SOURCE_HORIZON = 3600.0

#: Half-life (event-time seconds) of a source's recent-request weight.
RATE_HALF_LIFE = 10.0

#: Seconds a record id is remembered for deduplication (the worker's default).
DEDUP_HORIZON = 86400.0

#: Counter values below an instance's newest that are still told apart (one bit each).
ID_WINDOW = 64
_ID_MASK = (1 << ID_WINDOW) - 1
_SDK_ID = re.compile(r"([0-9a-f]{16})-([0-9a-f]{1,16})")

#: Ids not in the SDK's format remembered per key (oldest forgotten first beyond this).
MAX_FOREIGN_IDS = 10_000

Entry = dict[str, Any]
ScopesFor = Callable[[str, str], Iterable[str]]


def new_entry() -> Entry:
    return {
        "wm": 0.0,
        "s": {},
        "src": {},
        "t": [0, 0, 0, 0],
        "late": 0,
        "dup": 0,
        "ids": {},
        "m": {},
    }


def upgraded(entry: Entry) -> Entry:
    """A saved entry with the fields :func:`new_entry` has that older versions lacked (the
    fold reads them without checking)."""
    for field, empty in new_entry().items():
        entry.setdefault(field, empty)
    return entry


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
    """
    # In place, record by record in message order, every lookup hoisted: this loop is the
    # worker's hot path (a few microseconds a record). Grouping a message by key first, or
    # copying a busy key's buckets, cost more than the folding itself.
    late_total = dup_total = 0
    sdk_seen, foreign_seen = _sdk_seen_before, _foreign_seen
    sdk_id = _SDK_ID.fullmatch
    # scopes that do not depend on the record (no model policy): no call per record
    constant_scopes: tuple[str, ...] | None = getattr(scopes_for, "constant", None)
    mark = touched.add if touched is not None else None
    key = None
    e: Entry = {}
    ids: dict[str, Any] = {}
    models: dict[str, Any] = {}
    scopes: dict[str, dict[str, list[float]]] = {}
    totals: list[int] = []
    src: dict[str, Any] = {}
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
            duplicate = foreign_seen(e.setdefault("xid", {}), r.id, arrived)
        else:
            # The common cases inline: an instance's first record on this key, or one newer
            # than its newest here.
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
                    ((seen[1] << shift) | 1) & _ID_MASK if shift < ID_WINDOW else 1,
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
        totals[0] += 1
        totals[1] += req
        totals[2] += pt
        totals[3] += ct
        sums = models.get(r.model)
        if sums is None:
            models[r.model] = [1, req, pt, ct]
        else:
            sums[0] += 1
            sums[1] += req
            sums[2] += pt
            sums[3] += ct
        seen = src.get(r.source)
        src[r.source] = (
            (ts, float(req))
            if seen is None
            else (ts, seen[1] * 0.5 ** ((ts - seen[0]) / RATE_HALF_LIFE) + req)
            if ts > seen[0]
            else (seen[0], seen[1] + req)
        )
        # Only the minute window per record: its 0.5 s buckets roll up into the hour and
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
                was_late = _add_coarse(windows, ts, req, pt, ct, wm, grace) or was_late
                continue
            buckets = windows.get(_MINUTE_FIELD)
            if not buckets:
                windows[_MINUTE_FIELD] = [start, req, pt, ct]
            elif buckets[-4] == start:
                buckets[-3] += req
                buckets[-2] += pt
                buckets[-1] += ct
            elif buckets[-4] < start:
                buckets += (start, req, pt, ct)
            else:  # an older bucket: records arrive mostly in order, so this is rare
                _add_bucket(buckets, start, req, pt, ct)
        if was_late:
            late_total += 1
            e["late"] += 1
        prune_at = e.get("pa")
        if prune_at is None:  # a new entry: nothing to prune yet
            e["pa"] = wm + PRUNE_EVERY
        elif wm >= prune_at:
            prune(e, grace, horizon, now)
            e["pa"] = wm + PRUNE_EVERY
    return late_total, dup_total


def _first_at_or_after(buckets: list[float], start: float) -> int:
    """Index of the first flat bucket beginning at or after ``start`` (a multiple of 4)."""
    lo, hi = 0, len(buckets) // 4
    while lo < hi:
        mid = (lo + hi) // 2
        if buckets[mid * 4] < start:
            lo = mid + 1
        else:
            hi = mid
    return lo * 4


def _add_bucket(buckets: list[float], start: float, req: float, pt: float, ct: float) -> None:
    """Add usage to the flat bucket beginning at ``start``, inserting it in order if new."""
    i = _first_at_or_after(buckets, start)
    if i < len(buckets) and buckets[i] == start:
        buckets[i + 1] += req
        buckets[i + 2] += pt
        buckets[i + 3] += ct
    else:
        buckets[i:i] = (start, req, pt, ct)


#: A minute bucket beginning at ``start`` has left the minute window once the watermark reaches
#: ``start + _MINUTE_LATE`` (plus grace).
_MINUTE_LATE = MINUTE + _MINUTE_BUCKET


def _add_coarse(
    windows: dict[str, list[float]],
    ts: float,
    req: float,
    pt: float,
    ct: float,
    wm: float,
    grace: float,
) -> bool:
    """Add usage at ``ts`` to the hour and day windows; True if it was too late for one."""
    late = False
    for field, size, b in _COARSE:
        start = (ts // b) * b
        if start + size + b + grace <= wm:
            late = True
            continue
        buckets = windows.get(field)
        if buckets is None:
            windows[field] = [start, req, pt, ct]
        else:
            _add_bucket(buckets, start, req, pt, ct)
    return late


def _foreign_seen(foreign: dict[str, float], rid: str, arrived: float) -> bool:
    """Whether this key has counted ``rid``, an id not in the SDK's format; remembers it (and
    when it arrived) if not."""
    if rid in foreign:
        return True
    if len(foreign) >= MAX_FOREIGN_IDS:
        del foreign[next(iter(foreign))]
    foreign[rid] = arrived
    return False


def _sdk_seen_before(
    ids: dict[str, Any], prefix: str, seen: Any, counter: int, arrived: float
) -> bool:
    """Whether this key has counted counter ``counter`` of instance ``prefix``, which is not
    newer than the instance's newest here (``seen``); marks it counted if not. A counter more
    than :data:`ID_WINDOW` behind the newest is taken as counted."""
    newest, window = seen[0], seen[1]
    latest = arrived if arrived > seen[2] else seen[2]
    behind = newest - counter
    if behind >= ID_WINDOW or (window >> behind) & 1:
        ids[prefix] = (newest, window, latest)
        return True
    ids[prefix] = (newest, window | (1 << behind), latest)
    return False


def prune(
    entry: Entry, grace: float, horizon: float = DEDUP_HORIZON, now: float | None = None
) -> None:
    """Drop buckets that no longer count (allowing ``grace``), long-silent sources, and ids
    that arrived longer than the dedup ``horizon`` before ``now`` (default: the watermark)."""
    wm = entry["wm"]
    for windows in entry["s"].values():
        minute = windows.get(_MINUTE_FIELD)
        if minute and minute[0] + _MINUTE_LATE + grace <= wm:
            # minute buckets leaving the minute window roll up into the longer windows
            k, n = 0, len(minute)
            while k < n and minute[k] + _MINUTE_LATE + grace <= wm:
                start, req, pt, ct = minute[k : k + 4]
                _add_coarse(windows, start, req, pt, ct, wm, grace)
                k += 4
            del minute[:k]
        for field, size, b in _COARSE:
            buckets = windows.get(field)
            if buckets and buckets[0] + size + b + grace <= wm:
                k, n = 0, len(buckets)
                while k < n and buckets[k] + size + b + grace <= wm:
                    k += 4
                del buckets[:k]
    src = entry["src"]
    for source in [s for s, seen in src.items() if source_ts(seen) < wm - SOURCE_HORIZON]:
        del src[source]
    forget = (wm if now is None else now) - horizon
    ids = entry.get("ids")
    if ids:
        for prefix in [p for p, seen in ids.items() if seen[2] < forget]:
            del ids[prefix]
    foreign = entry.get("xid")
    if foreign:
        # insertion order is arrival order: the oldest sit in front
        while foreign and next(iter(foreign.values())) < forget:
            del foreign[next(iter(foreign))]


def source_ts(seen: Any) -> float:
    """A source's newest event time."""
    return float(seen[0])


def sliding_counts(
    entry: Entry, scope: str, size: int, now: float, max_expiries: int
) -> tuple[float, int, int, int, tuple[tuple[float, int, int, int], ...]]:
    """The sliding count of one window at ``now``, and when its usage frees.

    Returns ``(bucket_start, requests, prompt, completion, expiries)``: the start of the bucket
    holding ``now``, the sums over every bucket that counts at ``now``, and the first
    ``max_expiries`` of those buckets as ``(expires_at, requests, prompt, completion)``, oldest
    first, so a reader can subtract what has freed since ``now``. The hour and day windows
    include the minute buckets not rolled up into them yet.
    """
    # Every published state reads every window of every scope, so this runs for each key on
    # each publication: buckets are in start order, so a binary search finds the first that
    # counts and slices sum the rest in C.
    b = bucket_size(size)
    current = (now // b) * b
    floor = current - size  # a multiple of b: a bucket counts iff it starts at or after it
    windows = entry["s"].get(scope)
    if not windows:
        return current, 0, 0, 0, ()
    buckets: Any = windows.get(_FIELD_OF[size], ())
    minute: Any = windows.get(_MINUTE_FIELD) if size != MINUTE else None
    if minute and max_expiries:
        # expiries of the coarse buckets the minute buckets will roll into: merge them
        buckets = _merged(buckets, minute, b)
        minute = None
    i = _first_at_or_after(buckets, floor)
    req, pt, ct = sum(buckets[i + 1 :: 4]), sum(buckets[i + 2 :: 4]), sum(buckets[i + 3 :: 4])
    if minute:  # minute buckets start at or after the coarse bucket they roll into
        j = _first_at_or_after(minute, floor)
        req += sum(minute[j + 1 :: 4])
        pt += sum(minute[j + 2 :: 4])
        ct += sum(minute[j + 3 :: 4])
    lasting = size + b
    expiries = tuple(
        (float(buckets[k]) + lasting, int(buckets[k + 1]), int(buckets[k + 2]), int(buckets[k + 3]))
        for k in range(i, min(len(buckets), i + 4 * max_expiries), 4)
    )
    return current, int(req), int(pt), int(ct), expiries


def _merged(coarse: list[float], minute: list[float], b: float) -> list[float]:
    """Coarse flat buckets with the minute buckets added into the coarse buckets of length
    ``b`` they fall in, in start order."""
    merged: dict[float, list[float]] = {}
    for flat in (coarse, minute):
        for i in range(0, len(flat), 4):
            start = (flat[i] // b) * b
            sums = merged.get(start)
            if sums is None:
                merged[start] = [start, flat[i + 1], flat[i + 2], flat[i + 3]]
            else:
                sums[1] += flat[i + 1]
                sums[2] += flat[i + 2]
                sums[3] += flat[i + 3]
    return [x for bk in sorted(merged.values()) for x in bk]
