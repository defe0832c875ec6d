"""Per-key aggregation: pure functions over a JSON-able dict (the table's value).

One table entry per counter key holds every open window of every scope (key-wide and, where a
policy asks, per model), the newest event time seen from each emitting instance, and lifetime
totals. A whole message's records for a key are folded in at once, so the table is written once
per key per message, however many records it carried.

Entry layout::

    {"wm": 1700000000.5,                      # newest event time of this key (its watermark)
     "s": {"": {"60": [[start, req, prompt, completion], ...], "3600": [...], "86400": [...]}},
     "src": {"svc-a-17": 1700000000.5},       # newest event time per source
     "t": [records, requests, prompt, completion],
     "late": 3}                                # records past grace for at least one window
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from quotaflow.record import UsageRecord
from quotaflow.windows import DAY, HOUR, MINUTE, is_closed, window_start

#: Every scope keeps these windows, whatever its policy limits, so dashboards can show them.
WINDOW_SIZES: tuple[int, ...] = (MINUTE, HOUR, DAY)

#: Sources silent for this long (event time) are forgotten.
SOURCE_HORIZON = 3600.0

Entry = dict[str, Any]
ScopesFor = Callable[[str, str], Iterable[str]]


def new_entry() -> Entry:
    return {"wm": 0.0, "s": {}, "src": {}, "t": [0, 0, 0, 0], "late": 0}


def add_records(
    entry: Entry | None, records: Iterable[UsageRecord], scopes_for: ScopesFor, grace: float
) -> tuple[Entry, int]:
    """Fold records of one key into its entry; returns (new entry, records late for a window).

    ``scopes_for(key, model)`` names the scopes a record counts in (always ``""``, plus the model
    where a model policy binds it). A record too late for a window (its end + ``grace`` is at or
    before the key's watermark) is left out of that window but still counts in open ones and in
    the totals, and is reported as late.
    """
    e: Entry = new_entry() if entry is None else _copy(entry)
    scopes: dict[str, dict[str, list[list[float]]]] = e["s"]
    totals = e["t"]
    src = e["src"]
    late = 0
    for r in records:
        if r.ts > e["wm"]:
            e["wm"] = r.ts
        totals[0] += 1
        totals[1] += r.requests
        totals[2] += r.prompt_tokens
        totals[3] += r.completion_tokens
        if r.ts > src.get(r.source, 0.0):
            src[r.source] = r.ts
        was_late = False
        for scope in scopes_for(r.key, r.model):
            windows = scopes.setdefault(scope, {})
            for size in WINDOW_SIZES:
                start = window_start(r.ts, size)
                if is_closed(start, size, e["wm"], grace):
                    was_late = True
                    continue
                buckets = windows.setdefault(str(size), [])
                for b in buckets:
                    if b[0] == start:
                        b[1] += r.requests
                        b[2] += r.prompt_tokens
                        b[3] += r.completion_tokens
                        break
                else:
                    buckets.append([start, r.requests, r.prompt_tokens, r.completion_tokens])
                    buckets.sort(key=lambda b: b[0])
        if was_late:
            late += 1
    e["late"] += late
    prune(e, grace)
    return e, late


def prune(entry: Entry, grace: float) -> None:
    """Drop closed windows (keeping each scope's newest) and long-silent sources."""
    wm = entry["wm"]
    for windows in entry["s"].values():
        for size_text, buckets in windows.items():
            size = int(size_text)
            if len(buckets) > 1:
                keep = [b for b in buckets[:-1] if not is_closed(int(b[0]), size, wm, grace)]
                keep.append(buckets[-1])
                windows[size_text] = keep
    src = entry["src"]
    for source in [s for s, ts in src.items() if ts < wm - SOURCE_HORIZON]:
        del src[source]


def current_bucket(entry: Entry, scope: str, size: int, now: float) -> tuple[int, int, int, int]:
    """The counters of the window of ``size`` that contains ``now`` (zeros if none)."""
    start = window_start(now, size)
    for b in entry["s"].get(scope, {}).get(str(size), ()):
        if int(b[0]) == start:
            return start, int(b[1]), int(b[2]), int(b[3])
    return start, 0, 0, 0


def _copy(entry: Entry) -> Entry:
    # Table values must not be mutated in place: Faust only persists what is assigned back.
    return {
        "wm": entry.get("wm", 0.0),
        "s": {
            scope: {size: [list(b) for b in buckets] for size, buckets in windows.items()}
            for scope, windows in entry.get("s", {}).items()
        },
        "src": dict(entry.get("src", {})),
        "t": list(entry.get("t", [0, 0, 0, 0])),
        "late": entry.get("late", 0),
    }
