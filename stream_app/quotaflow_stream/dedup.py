"""Records count once: what an entry remembers of the ids it has counted.

Ids in the SDK's format (:mod:`quotaflow.ids`, ``<16 hex instance prefix>-<hex counter>``)
cost a few bytes per instance: the newest counter per instance and a 64-bit window below it
(the anti-replay window of IPsec), which tolerates records of one instance arriving up to
:data:`ID_WINDOW` counter values out of order; a counter further behind is taken as already
counted. Other ids are remembered one by one, at most :data:`MAX_FOREIGN_IDS` per key: past
that the oldest is forgotten, so a duplicate of a forgotten id counts again. Both live in the
entry, so they are changelog-backed and survive restarts like the counts, for the dedup horizon
of arrival time.

The fold inlines :func:`sdk_seen`'s common cases (an instance's first record on a key, or one
newer than its newest); ``tests/unit/test_dedup.py`` holds the inlined copy to this one.
"""

from __future__ import annotations

from quotaflow.ids import SDK_ID, parse_sdk_id
from quotaflow_stream.entry import Entry, InstanceIds

#: Counter values below an instance's newest that are still told apart (one bit each).
ID_WINDOW = 64
ID_MASK = (1 << ID_WINDOW) - 1

#: Ids not in the SDK's format remembered per key (oldest forgotten first beyond this).
MAX_FOREIGN_IDS = 10_000

#: Seconds a record id is remembered for deduplication (the worker's default).
DEDUP_HORIZON = 86400.0

#: The fold's matcher of SDK ids (the contract's own pattern).
sdk_id_match = SDK_ID.fullmatch


def sdk_seen(ids: dict[str, InstanceIds], prefix: str, counter: int, arrived: float) -> bool:
    """Whether this key has counted counter ``counter`` of instance ``prefix``; marks it
    counted (and when it arrived) if not."""
    seen = ids.get(prefix)
    if seen is None:
        ids[prefix] = (counter, 1, arrived)
        return False
    newest, window, latest = seen
    latest = arrived if arrived > latest else latest
    if counter > newest:
        shift = counter - newest
        window = ((window << shift) | 1) & ID_MASK if shift < ID_WINDOW else 1
        ids[prefix] = (counter, window, latest)
        return False
    return sdk_seen_before(ids, prefix, seen, counter, arrived)


def sdk_seen_before(
    ids: dict[str, InstanceIds], prefix: str, seen: InstanceIds, counter: int, arrived: float
) -> bool:
    """:func:`sdk_seen` for a counter not newer than the instance's newest here (``seen``)."""
    newest, window = seen[0], seen[1]
    latest = arrived if arrived > seen[2] else seen[2]
    behind = newest - counter
    if behind >= ID_WINDOW or (window >> behind) & 1:
        ids[prefix] = (newest, window, latest)
        return True
    ids[prefix] = (newest, window | (1 << behind), latest)
    return False


def foreign_seen(foreign: dict[str, float], rid: str, arrived: float) -> bool:
    """Whether this key has counted ``rid``, an id not in the SDK's format; remembers it (and
    when it arrived) if not."""
    if rid in foreign:
        return True
    if len(foreign) >= MAX_FOREIGN_IDS:
        del foreign[next(iter(foreign))]
    foreign[rid] = arrived
    return False


def seen(entry: Entry, rid: str, arrived: float) -> bool:
    """Whether ``entry`` has counted the record id ``rid`` (any format); remembers it if not.
    The reference the fold's inlined checks are tested against."""
    parsed = parse_sdk_id(rid)
    if parsed is None:
        return foreign_seen(entry.setdefault("xid", {}), rid, arrived)
    return sdk_seen(entry["ids"], *parsed, arrived)


def forget_ids(entry: Entry, forget: float) -> None:
    """Drop the ids that arrived before ``forget`` (the dedup horizon has passed)."""
    ids = entry.get("ids")
    if ids:
        for prefix in [p for p, s in ids.items() if s[2] < forget]:
            del ids[prefix]
    foreign = entry.get("xid")
    if foreign:
        # insertion order is arrival order: the oldest sit in front
        while foreign and next(iter(foreign.values())) < forget:
            del foreign[next(iter(foreign))]
