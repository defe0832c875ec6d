"""The shape of one counter key's table entry, and its flat buckets.

The fold (:mod:`quotaflow_stream.aggregate`) writes entries, the store
(:mod:`quotaflow_stream.store`) saves and loads them, and evaluation
(:mod:`quotaflow_stream.evaluate`) reads them. Field names stay short: every active key's entry
is MessagePack-encoded into the changelog each save, and saved entries must keep loading.

Buckets lie flat, :data:`STRIDE` numbers each in start order (``[start, *measures, start,
...]``, the measures of :data:`quotaflow.units.MEASURES`), and per-instance figures are tuples
replaced on update: a worker holds millions
of these, and Python's cycle collector scans every list it tracks (nested bucket lists cost a
quarter of the worker's time in collections), while a tuple of numbers is untracked once it
survives a collection. Per-model totals, a few per key, are lists updated in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from quotaflow.units import WIDTH, widen

#: Length of the lifetime totals lists (``t`` and each of ``m``), laid out as
#: :class:`quotaflow.state.Totals`: records, requests, prompt, completion tokens, cost, then
#: cached prompt, cache-write and reasoning tokens, and images (saved entries may have fewer:
#: :func:`upgraded` pads them).
TOTALS = 9

#: Numbers per flat bucket: its start, then every measure.
STRIDE = 1 + WIDTH

#: The entry layout this version writes (``v``): 2 has every measure in each bucket; entries
#: without ``v`` had requests, prompt and completion tokens only.
ENTRY_VERSION = 2
_V1_STRIDE = 4

#: Flat buckets: ``[start, *measures, start, ...]``, starts ascending.
Buckets = list[float]

#: One scope's windows, by window length as a string (``"60"``, ``"3600"``, ``"86400"``).
Windows = dict[str, Buckets]

#: A source's newest event time and its recent requests (decayed, see ``RATE_HALF_LIFE``).
SourceSeen = tuple[float, float]

#: An SDK instance's dedup state: newest counter, 64-bit window below it, newest arrival.
InstanceIds = tuple[int, int, float]


class Entry(TypedDict, total=False):
    """One counter key's aggregate (the table's value). ``total=False``: entries saved by
    earlier versions lack fields, which :func:`upgraded` fills."""

    #: Layout version (:data:`ENTRY_VERSION`).
    v: int
    #: Watermark: the newest event time of this key.
    wm: float
    #: Scope (``""`` key-wide, or a model name) -> its windows.
    s: dict[str, Windows]
    #: Source (emitting instance) -> (newest event time, recent requests).
    src: dict[str, SourceSeen]
    #: Lifetime totals: [records, requests, prompt tokens, completion tokens, cost in
    #: micro-dollars, cached prompt tokens, cache-write tokens, reasoning tokens, images]
    #: (entries saved by earlier versions have fewer; upgraded() pads them with zeros).
    t: list[int]
    #: Lifetime totals per model, laid out like ``t``.
    m: dict[str, list[int]]
    #: Records too late for at least one window.
    late: int
    #: Duplicate records dropped (an id counted before).
    dup: int
    #: SDK id prefix -> (newest counter, window of the 64 below it, newest arrival).
    ids: dict[str, InstanceIds]
    #: Other ids -> when each arrived (insertion order is arrival order).
    xid: dict[str, float]
    #: Prune again once the watermark reaches this.
    pa: float
    #: Alerts fired: ``"<limit>@<threshold>"`` -> start of the period it fired in. Only keys
    #: of policies with ``alerts`` have it (see :mod:`quotaflow_stream.alerts`).
    al: dict[str, float]
    #: The totals (``t``) as the worker's metrics last counted them: each publication adds
    #: what came since to its policy's counters (saved with the entry, so the next owner
    #: goes on from there).
    mt: list[int]


def new_entry() -> Entry:
    return {"v": ENTRY_VERSION, "wm": 0.0, "s": {}, "src": {}, "t": [0] * TOTALS, "late": 0,
            "dup": 0, "ids": {}, "m": {}, "mt": [0] * TOTALS}  # fmt: skip


def upgraded(entry: Entry) -> Entry:
    """A saved entry with the fields :func:`new_entry` has that older versions lacked (the
    fold reads them without checking)."""
    if entry.get("v", 1) < ENTRY_VERSION:
        # buckets of three measures: the measures added since count nothing in them
        for windows in entry.get("s", {}).values():
            for field, flat in windows.items():
                windows[field] = widen(flat, _V1_STRIDE)
        entry["v"] = ENTRY_VERSION
    # counted before metrics were: they go on from here, not from 0
    unmetered = "mt" not in entry
    for field, empty in new_entry().items():
        entry.setdefault(field, empty)  # type: ignore[misc]
    # totals saved before some units were counted: those start at 0
    for sums in (entry["t"], entry["mt"], *entry["m"].values()):
        if len(sums) < TOTALS:
            sums += [0] * (TOTALS - len(sums))
    if unmetered:
        entry["mt"] = list(entry["t"])
    return entry


def source_ts(seen: SourceSeen) -> float:
    """A source's newest event time."""
    return float(seen[0])


def first_at_or_after(buckets: Buckets, start: float) -> int:
    """Index of the first flat bucket beginning at or after ``start`` (a multiple of
    :data:`STRIDE`)."""
    lo, hi = 0, len(buckets) // STRIDE
    while lo < hi:
        mid = (lo + hi) // 2
        if buckets[mid * STRIDE] < start:
            lo = mid + 1
        else:
            hi = mid
    return lo * STRIDE


def add_bucket(buckets: Buckets, start: float, usage: Sequence[float]) -> None:
    """Add ``usage`` (every measure) to the flat bucket beginning at ``start``, inserting it in
    order if new."""
    i = first_at_or_after(buckets, start)
    if i < len(buckets) and buckets[i] == start:
        for j, amount in enumerate(usage, i + 1):
            buckets[j] += amount
    else:
        buckets[i:i] = (start, *usage)
