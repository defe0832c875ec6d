"""Quota state: what the stream publishes per counter key, and what SDKs follow.

One JSON document per key on the compacted decisions topic (and in the Redis snapshot)::

    {"v": 3, "key": "team-alpha", "published_at": 1700000000.12, "watermark": 1699999999.8,
     "scopes": {"": {"policy": "team-alpha",
                     "windows": {"60": [bucket_start, req, prompt, completion, cached, images,
                                        cost, [[expires_at, req, prompt, ..., cost], ...]]}}},
     "limits": [{"scope": "", "name": "requests_per_minute", "limit": 600, "used": 12,
                 "remaining": 588, "reset_at": 1700000040}],
     "throttled": false, "denied_by": null, "retry_after": 0.0,
     "sources": {"svc-a-17": 1699999999.8}, "instances": 2,
     "shares": {"svc-a-17": 0.61, "svc-b-2": 0.39},
     "totals": {"records": 812, "requests": 812, "prompt_tokens": 91000,
                "completion_tokens": 30100}}

``scopes`` holds each window's sliding count of every measure (:data:`quotaflow.units.MEASURES`)
at ``published_at`` (``""`` is key-wide, otherwise a model; see :mod:`quotaflow.windows`) and
the next buckets to expire, so each SDK can apply its
own policies and clock and free usage as its buckets expire without waiting for a new state.
``limits`` is the worker's own evaluation, for readers without policies (gateway headers,
dashboards). ``sources`` maps each emitting instance to the event time of its newest record that
the state includes: an SDK drops its own pending usage up to that point. ``shares`` gives each
active instance its share of the remaining budget until the next state.
A heartbeat (``{"v": 3, "heartbeat": true, "instances": 20, ...}``) under :data:`HEARTBEAT_KEY`
tells followers that the worker is alive when no key changes, and how many instances it has
heard from lately (the share a key with no state yet starts from).

Version 3 added the measures after completion tokens. This SDK still reads states and
heartbeats of version 2 workers (their windows widened with zeros), but a version 2 SDK does not
read version 3: upgrade SDKs and gateways before workers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from quotaflow.units import WIDTH
from quotaflow.windows import SLIDE_BUCKETS, bucket_size

STATE_VERSION = 3
#: Versions this SDK reads (version 2 windows lack the measures after completion tokens).
READABLE_VERSIONS = (2, 3)
HEARTBEAT_KEY = "__quotaflow_heartbeat__"

#: Seconds of bucket expiries a state lists: more than the seconds between two states of a busy
#: key (``refresh_interval``, 5 s), so a key at its limit frees on time between them.
STATE_EXPIRY_SECONDS = 8.0
#: Bucket expiries listed per window (its oldest buckets with usage): at least 16, and as many
#: as cover :data:`STATE_EXPIRY_SECONDS` of buckets.
STATE_EXPIRIES: dict[int, int] = {
    size: max(16, math.ceil(STATE_EXPIRY_SECONDS / bucket_size(size))) for size in SLIDE_BUCKETS
}

#: ``(expires_at, *measures)``: a bucket's measures (:data:`~quotaflow.units.MEASURES`) and
#: when they stop counting.
Expiry = tuple[float, ...]
#: ``(bucket_start, *measures, expiries)``: a window's sliding count of every measure; the
#: expiries are last, at :data:`EXPIRIES`.
WindowCounts = tuple[Any, ...]
#: Where a window's expiries are in its :data:`WindowCounts`.
EXPIRIES = 1 + WIDTH


def _window(w: list[Any]) -> WindowCounts:
    """A window as published (``[start, *measures, expiries]``), widened to this version's
    measures if an older worker published fewer."""
    *counts, expiries = w
    pad = (0,) * (EXPIRIES - len(counts))
    return (
        float(counts[0]), *(int(x) for x in counts[1:]), *pad,
        tuple((float(x[0]), *(int(v) for v in x[1:]), *pad) for x in expiries),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class LimitStatus:
    scope: str
    name: str
    limit: int
    used: int
    remaining: int
    reset_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "name": self.name,
            "limit": self.limit,
            "used": self.used,
            "remaining": self.remaining,
            "reset_at": self.reset_at,
        }


class Totals(NamedTuple):
    """A key's (or a key and model's) lifetime sums, in the order workers keep them (a tuple:
    every state carries one per model, built and encoded on each publication)."""

    records: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Spend in micro-dollars (states from workers before v2 records say 0).
    cost_micros: int = 0
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    images: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


#: Totals' fields, in the order of a worker's lists and of a state's per-model arrays.
TOTAL_FIELDS = Totals._fields

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class QuotaState:
    """The latest quota state of one counter key."""

    key: str
    published_at: float
    watermark: float
    scopes: dict[str, dict[int, WindowCounts]]
    scope_policies: dict[str, str]
    limits: tuple[LimitStatus, ...] = ()
    throttled: bool = False
    denied_by: str | None = None
    retry_after: float = 0.0
    sources: dict[str, float] = field(default_factory=dict)
    instances: int = 0
    shares: dict[str, float] = field(default_factory=dict)
    totals: Totals = Totals()  # noqa: RUF009 (a tuple: immutable, safe to share)
    #: Lifetime totals per model, for dashboards and audits.
    models: dict[str, Totals] = field(default_factory=dict)
    #: Limits of shadow-mode policies (``enforce: false``) at their ceiling: they would
    #: throttle the key, and do not.
    shadow: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        doc = {
            "v": STATE_VERSION,
            "key": self.key,
            "published_at": self.published_at,
            "watermark": self.watermark,
            "scopes": {
                scope: {
                    "policy": self.scope_policies.get(scope),
                    "windows": {str(size): list(w) for size, w in windows.items()},
                }
                for scope, windows in self.scopes.items()
            },
            "limits": [lim.to_dict() for lim in self.limits],
            "throttled": self.throttled,
            "denied_by": self.denied_by,
            "retry_after": self.retry_after,
            "sources": self.sources,
            "instances": self.instances,
            "shares": self.shares,
            "totals": dict(zip(TOTAL_FIELDS, self.totals, strict=True)),
            # msgspec writes a named tuple as an array
            "models": self.models,
            "shadow": self.shadow,
        }
        # msgspec: a busy worker encodes thousands of states a second (~4x json.dumps)
        return _encode(doc)

    @classmethod
    def from_json(cls, raw: bytes | str) -> QuotaState:
        """Parse a published state; raises ``ValueError`` (or ``KeyError``) on a malformed one."""
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("v") not in READABLE_VERSIONS or "key" not in doc:
            raise ValueError(f"not a quotaflow v{STATE_VERSION} quota state")
        scopes: dict[str, dict[int, WindowCounts]] = {}
        policies: dict[str, str] = {}
        for scope, body in doc.get("scopes", {}).items():
            scopes[scope] = {int(size): _window(w) for size, w in body.get("windows", {}).items()}
            if body.get("policy"):
                policies[scope] = body["policy"]
        totals = doc.get("totals") or {}
        return cls(
            key=doc["key"],
            published_at=float(doc["published_at"]),
            watermark=float(doc.get("watermark", 0.0)),
            scopes=scopes,
            scope_policies=policies,
            limits=tuple(LimitStatus(**lim) for lim in doc.get("limits", [])),
            throttled=bool(doc.get("throttled", False)),
            denied_by=doc.get("denied_by"),
            retry_after=float(doc.get("retry_after", 0.0)),
            sources={str(k): float(v) for k, v in doc.get("sources", {}).items()},
            instances=int(doc.get("instances", 0)),
            shares={str(k): float(v) for k, v in doc.get("shares", {}).items()},
            models={
                str(m): Totals(*(int(x) for x in t[: len(TOTAL_FIELDS)]))
                for m, t in doc.get("models", {}).items()
            },
            totals=Totals(**{name: int(totals.get(name, 0)) for name in TOTAL_FIELDS}),
            shadow=tuple(str(x) for x in doc.get("shadow") or ()),
        )


def heartbeat_json(
    published_at: float, worker: str, instances: int, policy_version: int | None = None
) -> bytes:
    return json.dumps(
        {
            "v": STATE_VERSION,
            "heartbeat": True,
            "published_at": published_at,
            "worker": worker,
            "instances": instances,
            # the live policy version the worker enforces (null: its policy file)
            "policy_version": policy_version,
        }
    ).encode()


class Heartbeat(NamedTuple):
    """A worker's heartbeat: when it was sent (worker clock), by whom, and how many instances
    that worker heard from lately."""

    published_at: float
    worker: str
    instances: int
    #: The live policy version the worker enforces (None: its policy file).
    policy_version: int | None = None


def read_heartbeat(raw: bytes | None) -> Heartbeat | None:
    """The heartbeat in ``raw``, or None if it is not one this SDK reads (anyone who can write
    the decisions topic can write bytes under the heartbeat key)."""
    try:
        doc = json.loads(raw or b"")
        if doc.get("v") not in READABLE_VERSIONS or not doc.get("heartbeat"):
            return None
        version = doc.get("policy_version")
        return Heartbeat(
            float(doc["published_at"]), str(doc.get("worker", "")), int(doc.get("instances", 0)),
            version if isinstance(version, int) and not isinstance(version, bool) else None,
        )  # fmt: skip
    except (ValueError, TypeError, AttributeError, KeyError):
        return None
