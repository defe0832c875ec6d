"""Resident memory per cached key (SDK) and per key-window (worker state), each measured in a
fresh process: ``python -m quotaflow_producers.bench.memory sdk|worker COUNT`` prints JSON."""

from __future__ import annotations

import gc
import json
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def probe_sdk(count: int) -> dict[str, float]:
    from quotaflow.cache import QuotaCache
    from quotaflow.policies import parse_policies
    from quotaflow.state import QuotaState, Totals

    policies = parse_policies({"policies": [{"name": "p", "default": True,
                                             "limits": {"requests_per_minute": 10}}]})  # fmt: skip
    cache = QuotaCache(policies, "probe")
    now = time.time()
    minute, hour, day = (int(now // s) * s for s in (60, 3600, 86400))
    gc.collect()
    before = rss_bytes()
    for i in range(count):
        cache.apply_state(
            QuotaState(
                key=f"key-{i:07d}",
                published_at=now,
                watermark=now,
                scopes={
                    "": {
                        60: (minute, 3, 300, 90, ()),
                        3600: (hour, 9, 900, 270, ()),
                        86400: (day, 20, 2000, 600, ()),
                    }
                },
                scope_policies={"": "p"},
                sources={f"svc-{i % 20}": now},
                instances=1,
                totals=Totals(20, 20, 2000, 600),
            )
        )
    gc.collect()
    grown = rss_bytes() - before
    return {"keys": count, "rss_growth_bytes": grown, "bytes_per_key": round(grown / count)}


def probe_worker(key_windows: int) -> dict[str, float]:
    from quotaflow.record import WireRecord
    from quotaflow_stream.aggregate import WINDOW_SIZES, add_records

    keys = key_windows // len(WINDOW_SIZES)  # each key holds a minute, hour and day window
    now = time.time()
    table: dict[str, object] = {}
    gc.collect()
    before = rss_bytes()
    for i in range(keys):
        key = f"key-{i:07d}"
        rec = WireRecord(id=str(i), ts=now, key=key, model="gpt-4o", prompt_tokens=100,
                          completion_tokens=20, source=f"svc-{i % 20}")  # fmt: skip
        table[key], _ = add_records(None, [rec], lambda k, m: ("",), grace=10)
    gc.collect()
    grown = rss_bytes() - before
    return {
        "key_windows": keys * len(WINDOW_SIZES),
        "keys": keys,
        "rss_growth_bytes": grown,
        "bytes_per_key_window": round(grown / (keys * len(WINDOW_SIZES))),
        "bytes_per_key": round(grown / keys),
    }


if __name__ == "__main__":
    what, count = sys.argv[1], int(sys.argv[2])
    result = probe_sdk(count) if what == "sdk" else probe_worker(count)
    print(json.dumps(result))
