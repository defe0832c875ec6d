"""The gateway's Prometheus metrics, served at ``/metrics``.

What an operator of a metering proxy watches: requests and their latency by route and status,
the upstream's own latency and errors, denials by reason, and the embedded QuotaClient's view of
the stream (how long since the stream was last heard, per policy whether that exceeds its
``max_staleness``, what is buffered). Labels are bounded: routes are the metered ones or
``other``, never a caller's path or key.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from quotaflow.client import QuotaClient

#: Route label of every unmetered path (passthrough), so a caller cannot mint series.
OTHER_ROUTE = "other"
#: Why the gateway answered instead of the upstream (the 429s and the unpriced 400).
DENIAL_REASONS = ("limit", "budget", "share", "stale_closed", "unpriced")
#: What went wrong upstream: no answer in time, no connection, a 5xx, the provider's own 429.
UPSTREAM_ERRORS = ("timeout", "unreachable", "server_error", "rate_limited")
# Local upstreams answer in about a millisecond, providers in seconds, streams in minutes.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    """Counters the gateway adds to as it serves; rendered at each scrape."""

    def __init__(self, routes: tuple[str, ...], quota: QuotaClient) -> None:
        self.routes = frozenset(routes)
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "quotaflow_gateway_requests", "Requests answered, by route and HTTP status.",
            ["route", "status"], registry=self.registry,
        )  # fmt: skip
        self.duration = Histogram(
            "quotaflow_gateway_request_duration_seconds",
            "From the request read to the answer's last byte (streams included), by route.",
            ["route"], buckets=_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "quotaflow_gateway_upstream_duration_seconds",
            "From sending to the upstream to its response headers, by route.",
            ["route"], buckets=_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "quotaflow_gateway_upstream_errors", "Upstream failures by route and kind.",
            ["route", "kind"], registry=self.registry,
        )  # fmt: skip
        self.denials = Counter(
            "quotaflow_gateway_denials", "Calls the gateway refused before the upstream.",
            ["route", "reason"], registry=self.registry,
        )  # fmt: skip
        # Every known series exists from the start at zero: rate() and alerts see 0, not nothing.
        for route in (*sorted(self.routes), OTHER_ROUTE):
            self.duration.labels(route)
            self.upstream_duration.labels(route)
            for kind in UPSTREAM_ERRORS:
                self.upstream_errors.labels(route, kind)
            for reason in DENIAL_REASONS:
                self.denials.labels(route, reason)
        self.registry.register(_ClientCollector(quota))

    def route(self, path: str) -> str:
        return path if path in self.routes else OTHER_ROUTE

    def answered(self, route: str, status: int, started: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.duration.labels(route).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return _generate_latest(self.registry)


class _ClientCollector:
    """The embedded QuotaClient's stats, read at each scrape."""

    def __init__(self, quota: QuotaClient) -> None:
        self.quota = quota

    def collect(self) -> Iterator[Any]:
        quota = self.quota
        stats = quota.stats()
        last = quota.cache.last_heard
        silence = quota.clock() - last if last is not None else None
        yield GaugeMetricFamily(
            "quotaflow_sdk_stream_silence_seconds",
            "Seconds since a state or heartbeat of the stream was last heard (-1: never).",
            value=-1.0 if silence is None else silence,
        )
        stale = GaugeMetricFamily(
            "quotaflow_sdk_stale",
            "1 where the stream has been silent longer than the policy's max_staleness: its "
            "fail mode decides instead of the fleet's counts.",
            labels=["policy"],
        )
        staleness = GaugeMetricFamily(
            "quotaflow_policy_max_staleness_seconds",
            "Each policy's max_staleness.", labels=["policy"],
        )  # fmt: skip
        for policy in quota.policies.policies:
            over = silence is None or silence > policy.max_staleness
            stale.add_metric([policy.name], 1.0 if over else 0.0)
            staleness.add_metric([policy.name], policy.max_staleness)
        yield stale
        yield staleness
        for name, value, doc in (
            ("quotaflow_sdk_records_sent", stats["records_sent"], "Usage records delivered."),
            (
                "quotaflow_sdk_records_overflowed",
                stats["records_overflowed"],
                "Records past the memory bound (journaled, or lost without a journal).",
            ),
            ("quotaflow_sdk_states_applied", stats["states_applied"], "Quota states followed."),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "quotaflow_sdk_records_buffered", "Usage records waiting to be sent.",
            value=stats["records_buffered"],
        )  # fmt: skip
        yield GaugeMetricFamily(
            "quotaflow_sdk_policy_version",
            "Live policy version in force (-1: the policy file).",
            value=-1 if stats["policy_version"] is None else stats["policy_version"],
        )
