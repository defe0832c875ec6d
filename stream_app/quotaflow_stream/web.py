"""The worker's web server: the live dashboard, its JSON API, server-sent events and
Prometheus metrics.

    GET /                 the dashboard (static files from this package: works offline)
    GET /api/stats        the worker's counters and readiness
    GET /api/keys         every key: usage against limits, throttle, totals
    GET /api/keys/{key}   one key's full quota state
    GET /api/events       server-sent events: the dashboard's summary once per tick
    GET /metrics          Prometheus metrics
    GET /healthz          liveness: the event loop answers (no token, no data)
    GET /readyz           readiness: tables recovered, no rebalance under way (503 otherwise)

Keys this worker owns come from its own latest states; keys of other workers from the Redis
snapshot, so every worker answers for every key. The server binds to 127.0.0.1 unless told
otherwise; with ``worker.api_token`` set every data route asks for ``Authorization: Bearer
<token>`` (or ``?token=`` for the browser's event stream, which cannot set headers); the page
and its script carry no data and load without it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quotaflow.keys import bearer_token, same_secret
from quotaflow.state import TOTAL_FIELDS, QuotaState
from quotaflow.stats import percentile
from quotaflow.units import MICROS
from quotaflow_stream import dashboard

if TYPE_CHECKING:
    from quotaflow_stream.agents import StreamWorker

STATIC = Path(__file__).parent / "static"
_STATIC_FILES = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


class WebApi:
    """Registers the pages on the worker's Faust app."""

    def __init__(self, worker: StreamWorker) -> None:
        self.worker = worker
        self.app = worker.app
        w = worker.settings.worker
        self.token = w.api_token.get_secret_value() if w.api_token else None
        self.tick = w.dashboard_interval
        self.metrics = _Metrics(worker)
        self._rate = _Rate()
        api = self

        # Faust views want plain functions ``(web, request, **params)``, not bound methods.
        # The page and its script carry no data: they load without the token, and the script
        # sends it (from the page's ?token=) with every data request.
        async def index(web: Any, request: Any) -> Any:
            return await api._index(web, request)

        async def static(web: Any, request: Any, name: str) -> Any:
            return await api._static(web, name)

        async def stats(web: Any, request: Any) -> Any:
            return await api._guard(web, request, api._stats)

        async def keys(web: Any, request: Any) -> Any:
            return await api._guard(web, request, api._keys)

        async def key(web: Any, request: Any, key: str) -> Any:
            return await api._guard(web, request, lambda w, r: api._key(w, key))

        async def events(web: Any, request: Any) -> Any:
            return await api._guard(web, request, api._events)

        async def metrics(web: Any, request: Any) -> Any:
            return await api._guard(web, request, api._metrics)

        self.app.page("/")(index)
        self.app.page("/static/{name}")(static)
        self.app.page("/api/stats")(stats)
        self.app.page("/api/keys")(keys)
        self.app.page("/api/keys/{key}")(key)
        self.app.page("/api/events")(events)
        self.app.page("/metrics")(metrics)

        # Probes (Kubernetes, compose) carry no data and need no token.
        async def healthz(web: Any, request: Any) -> Any:
            return web.json({"ok": True})

        async def readyz(web: Any, request: Any) -> Any:
            ready = api.worker.serving
            return web.json({"ready": ready}, status=200 if ready else 503)

        self.app.page("/healthz")(healthz)
        self.app.page("/readyz")(readyz)

    # -- access --------------------------------------------------------------------------

    async def _guard(self, web: Any, request: Any, handler: Any) -> Any:
        if self.token is not None and not self._authorized(request):
            return web.json(
                {"error": "unauthorized: send Authorization: Bearer <worker.api_token>"},
                status=401,
            )
        return await handler(web, request)

    def _authorized(self, request: Any) -> bool:
        assert self.token is not None
        given = bearer_token(request.headers.get("Authorization", ""))
        return same_secret(request.query.get("token", "") if given is None else given, self.token)

    # -- pages ---------------------------------------------------------------------------

    async def _index(self, web: Any, request: Any) -> Any:
        return web.html((STATIC / "index.html").read_text(encoding="utf-8"))

    async def _static(self, web: Any, name: str) -> Any:
        kind = _STATIC_FILES.get(name)
        if kind is None:
            return web.json({"error": f"no static file {name!r}"}, status=404)
        return web.bytes((STATIC / name).read_bytes(), content_type=kind)

    async def _stats(self, web: Any, request: Any) -> Any:
        return web.json(self.worker.stats())

    async def _keys(self, web: Any, request: Any) -> Any:
        now = time.time()
        states = await self.all_states()
        rows = sorted((dashboard.key_row(s, now) for s in states), key=lambda r: r["key"])
        return web.json({"keys": rows, "count": len(rows)})

    async def _key(self, web: Any, key: str) -> Any:
        state = self.worker.current_state(key)
        if state is None:
            raw = (await self.worker.snapshot.read_all() or {}).get(key)
            if raw is None:
                return web.json({"error": f"no usage recorded for key {key!r}"}, status=404)
            return web.bytes(raw, content_type="application/json")
        return web.bytes(state.to_json(), content_type="application/json")

    async def _events(self, web: Any, request: Any) -> Any:
        from aiohttp import web as aioweb

        response = aioweb.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            while True:
                body = json.dumps(await self.summary(), separators=(",", ":"))
                await response.write(f"event: summary\ndata: {body}\n\n".encode())
                await asyncio.sleep(self.tick)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    async def _metrics(self, web: Any, request: Any) -> Any:
        payload, content_type = self.metrics.render(await self._lag())
        return web.bytes(payload, content_type=content_type.split(";")[0])

    # -- data ----------------------------------------------------------------------------

    async def all_states(self) -> list[QuotaState]:
        """This worker's latest states, plus the snapshot's for keys other workers own."""
        mine = dict(self.worker.publisher.latest)
        others = await self.worker.snapshot.read_all() or {}
        for key, raw in others.items():
            if key not in mine:
                try:
                    mine[key] = QuotaState.from_json(raw)
                except (ValueError, KeyError, TypeError):
                    continue
        return list(mine.values())

    async def summary(self) -> dict[str, Any]:
        now = time.time()
        c = self.worker.counters
        worker = {
            "records": c.records,
            "records_per_s": self._rate.update(c.records, now),
            "duplicates": c.duplicates,
            "late": c.late,
            "dlq": c.dlq,
            "states_published": c.states_published,
            "alerts": c.alerts,
            "consumer_lag": sum((await self._lag()).values()),
            "ready": self.worker.ready,
        }
        return dashboard.summary(
            await self.all_states(), now, worker, list(self.worker.publisher.latencies_ms)
        )

    async def _lag(self) -> dict[int, int]:
        """Messages behind the end of each usage partition this worker consumes."""
        app = self.app
        lag: dict[int, int] = {}
        try:
            consumer = app.consumer
            for tp in consumer.assignment():
                if tp.topic != self.worker.usage_topic.get_topic_name():
                    continue
                position = await consumer.position(tp)
                if position is not None:
                    lag[tp.partition] = max(consumer.highwater(tp) - position, 0)
        except Exception:  # not started, rebalancing: no figure rather than an error page
            return lag
        return lag


class _Rate:
    """Records per second between two summaries."""

    def __init__(self) -> None:
        self._last: tuple[int, float] | None = None
        self.value = 0.0

    def update(self, count: int, now: float) -> float:
        if self._last is not None and now > self._last[1]:
            self.value = round((count - self._last[0]) / (now - self._last[1]), 1)
        self._last = (count, now)
        return self.value


class _Metrics:
    """Prometheus metrics, read from the worker's counters at each scrape."""

    def __init__(self, worker: StreamWorker) -> None:
        from prometheus_client import CollectorRegistry

        self.worker = worker
        self._lag: dict[int, int] = {}
        self._rate = _Rate()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def render(self, lag: dict[int, int]) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._lag = lag
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.worker.counters
        for name, value, doc in (
            ("quotaflow_records", c.records, "Usage records aggregated (duplicates excluded)."),
            ("quotaflow_messages", c.messages, "Usage messages consumed."),
            ("quotaflow_duplicate_records", c.duplicates, "Records dropped as duplicates."),
            ("quotaflow_late_records", c.late, "Records too late for at least one window."),
            ("quotaflow_dlq_records", c.dlq, "Records sent to the dead-letter topic."),
            ("quotaflow_states_published", c.states_published, "Quota states published."),
            ("quotaflow_alerts", c.alerts, "Soft-budget alert events emitted."),
            ("quotaflow_heartbeats", c.heartbeats, "Heartbeats published (one a second)."),
            (
                "quotaflow_denials",
                self.worker.publisher.throttle_onsets,
                "Keys that became throttled.",
            ),
            (
                "quotaflow_shadow_denials",
                self.worker.publisher.shadow_onsets,
                "Keys that reached a limit of a shadow-mode policy (enforce: false), unthrottled.",
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "quotaflow_records_per_second", "Records aggregated per second since the last scrape.",
            value=self._rate.update(c.records, time.time()),
        )  # fmt: skip
        usage = CounterMetricFamily(
            "quotaflow_usage",
            "Usage counted per key-wide policy since the worker started (one series per policy "
            "and unit, never per key).",
            labels=["policy", "unit"],
        )
        cost = CounterMetricFamily(
            "quotaflow_cost_usd", "Spend per key-wide policy, in dollars.", labels=["policy"]
        )
        for policy, sums in sorted(self.worker.publisher.metered.items()):
            for unit, value in zip(TOTAL_FIELDS, sums, strict=True):
                if unit == "cost_micros":
                    cost.add_metric([policy], value / MICROS)
                else:
                    usage.add_metric([policy, unit], value)
        yield usage
        yield cost
        yield from self._policies()
        throttled = sum(1 for s in self.worker.publisher.latest.values() if s.throttled)
        yield GaugeMetricFamily(
            "quotaflow_throttled_keys", "Keys of this worker at a limit now.", value=throttled
        )
        lag = GaugeMetricFamily(
            "quotaflow_consumer_lag", "Usage messages not yet consumed.", labels=["partition"]
        )
        for partition, value in sorted(self._lag.items()):
            lag.add_metric([str(partition)], value)
        yield lag
        reasons = CounterMetricFamily(
            "quotaflow_state_publications",
            "States published, by why: usage (decisions), refresh, recovery, policy.",
            labels=["reason"],
        )
        for reason, count in self.worker.publisher.published_by_reason.items():
            reasons.add_metric([reason], count)
        yield reasons
        latencies = list(self.worker.publisher.latencies_ms)
        latency = GaugeMetricFamily(
            "quotaflow_decision_latency_ms",
            "Record produced (its event time) to the state counting it published, for recent "
            "states published because of new usage (refreshes and recoveries excluded).",
            labels=["quantile"],
        )
        for q in (50, 99):
            ms = percentile(latencies, q)
            if ms is not None:
                latency.add_metric([str(q / 100)], ms)
        yield latency

    def _policies(self) -> Any:
        """Each policy's limits at their fullest key, and what stale means for each policy."""
        from prometheus_client.core import GaugeMetricFamily

        worker = self.worker
        yield GaugeMetricFamily(
            "quotaflow_worker_ready", "1 when tables are recovered and no rebalance is under way.",
            value=1.0 if worker.serving else 0.0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "quotaflow_policy_version", "Live policy version in force (-1: the policy file).",
            value=-1 if worker.policy_version is None else worker.policy_version,
        )  # fmt: skip
        staleness = GaugeMetricFamily(
            "quotaflow_policy_max_staleness_seconds", "Each policy's max_staleness.",
            labels=["policy"],
        )  # fmt: skip
        for policy in worker.policies.policies:
            staleness.add_metric([policy.name], policy.max_staleness)
        yield staleness
        # The fullest key of each (policy, limit): one series per limit a policy states, never
        # one per key. Money limits are fractions like the rest.
        fullest: dict[tuple[str, str], float] = {}
        for state in worker.publisher.latest.values():
            policies = state.scope_policies
            for lim in state.limits:
                if lim.limit <= 0:
                    continue
                label = (policies.get(lim.scope) or "", lim.name)
                used = lim.used / lim.limit
                if used > fullest.get(label, -1.0):
                    fullest[label] = used
        utilization = GaugeMetricFamily(
            "quotaflow_limit_utilization",
            "Used over limit for the fullest key of each policy's limit (1 = at the limit).",
            labels=["policy", "limit"],
        )
        for (policy_name, limit), value in sorted(fullest.items()):
            utilization.add_metric([policy_name, limit], value)
        yield utilization
