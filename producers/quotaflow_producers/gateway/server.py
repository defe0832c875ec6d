"""The gateway's HTTP side: an aiohttp reverse proxy that meters OpenAI-compatible calls.

Per metered call (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``): find the
counter key, reserve the call in the embedded :class:`QuotaClient` (no I/O), answer 429 at once
if it does not fit, else forward it and settle the reservation with the usage the upstream
reports (for streams: the final usage chunk, or the relayed content counted), so every usage
record carries the provider's own figures. Streams are relayed chunk by chunk, never buffered.
Other ``/v1/*`` routes pass through, counted as requests where the key's policy lists them in
``count_routes``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from quotaflow._exceptions import ConfigError, QuotaExceeded, RecordError
from quotaflow.client import QuotaClient
from quotaflow.keys import bearer_token, same_secret
from quotaflow.prices import dollars
from quotaflow.record import looks_like_secret
from quotaflow.reservation import Reservation
from quotaflow.settings import QuotaflowSettings
from quotaflow.streaming import StreamUsage
from quotaflow.tokens import encoding_for_model
from quotaflow_producers.gateway.keys import resolve_key
from quotaflow_producers.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from quotaflow_producers.gateway.responses import (
    RateLimitTemplate,
    openai_error,
    ratelimit_headers,
    remaining_tokens,
)

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from quotaflow_producers.gateway.tracing import CallTracer

log = logging.getLogger(__name__)

METERED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
#: The call's price in dollars (exact, from integer micro-dollars), and the table that priced it.
COST_HEADER = "x-quotaflow-cost-usd"
PRICE_VERSION_HEADER = "x-quotaflow-price-version"
# Never forwarded: connection-level headers, and what the gateway itself sets.
_DROP_REQUEST = {"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                 "accept-encoding", "te", "upgrade", "proxy-authorization"}  # fmt: skip
_DROP_RESPONSE = {"content-length", "transfer-encoding", "connection", "keep-alive",
                  "content-encoding"}  # fmt: skip


class Gateway:
    """Build with settings and a QuotaClient; ``app`` is the aiohttp application."""

    def __init__(
        self,
        settings: QuotaflowSettings,
        quota: QuotaClient,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        problem = settings.gateway.salt_problem()
        if problem is not None:
            raise ConfigError(problem)
        self.settings = settings
        self.g = settings.gateway
        self.quota = quota
        self.upstream = self.g.upstream.rstrip("/")
        self.template = (
            RateLimitTemplate.load(self.g.rate_limit_response_file)
            if self.g.rate_limit_response_file
            else None
        )
        self._session: aiohttp.ClientSession | None = None
        self.app = web.Application(client_max_size=self.g.max_body_bytes)
        self.app.router.add_route("*", "/v1/{tail:.*}", self.handle)
        self.app.router.add_get("/healthz", self.health)
        self.app.router.add_get("/readyz", self.readiness)
        self.app.router.add_get("/metrics", self.scrape)
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._stop)
        self.denied = 0
        self.forwarded = 0
        self.metrics = GatewayMetrics(METERED, quota)
        self.tracer: CallTracer | None = None
        if tracer_provider is not None or settings.otel.enabled:
            from quotaflow_producers.gateway.tracing import CallTracer  # the optional extra

            self.tracer = CallTracer(self.upstream, tracer_provider)
        self._metrics_token = (
            self.g.metrics_token.get_secret_value() if self.g.metrics_token else None
        )

    async def _start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.g.upstream_connect_timeout,
                sock_read=self.g.upstream_timeout,
            ),
            auto_decompress=False,
        )

    async def _stop(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: the event loop answers."""
        return web.json_response({"ok": True, "forwarded": self.forwarded, "denied": self.denied})

    async def readiness(self, request: web.Request) -> web.Response:
        """Readiness: the embedded client is open and its follower has warm-started, so the
        first calls are decided on the fleet's counts (503 until then)."""
        follower = self.quota.follower
        ready = self.quota.state.value == "opened" and (follower is None or follower.ready.is_set())
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def scrape(self, request: web.Request) -> web.Response:
        token = bearer_token(request.headers.get("Authorization", ""))
        if self._metrics_token is not None and (
            token is None or not same_secret(token, self._metrics_token)
        ):
            return openai_error(401, "The metrics need the gateway's metrics token.",
                                code="unauthorized")  # fmt: skip
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # -- the proxy ---------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        route = self.metrics.route(request.path)
        status = 499  # unless answered: the caller went away (or the handler was cancelled)
        try:
            response = await self._handle(request)
            status = response.status
            return response
        finally:
            self.metrics.answered(route, status, started)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return openai_error(
                413,
                f"Request body exceeds the gateway's limit of {self.g.max_body_bytes} bytes.",
                code="request_too_large",
            )
        key = resolve_key(request.headers, request.remote, self.g)
        if key is None:
            return openai_error(
                401,
                "No counter key: send an API key, or the "
                f"{self.g.key_header} header, as the gateway is configured to expect.",
                code="missing_key",
            )
        if looks_like_secret(key):
            # A credential sent as a counter key: refused before the upstream (it would be
            # served and then could not be recorded), and never repeated or logged.
            return openai_error(
                400,
                f"The counter key looks like an API secret; send an id in {self.g.key_header}, "
                "never a credential.",
                code="invalid_counter_key",
            )
        if request.method == "POST" and request.path in METERED:
            return await self._metered(request, raw, key)
        return await self._passthrough(request, raw, key)

    async def _metered(self, request: web.Request, raw: bytes, key: str) -> web.StreamResponse:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return openai_error(400, f"We could not parse the JSON body of your request: {exc}")
        if not isinstance(body, dict):
            return openai_error(400, "The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return openai_error(400, "You must provide a model parameter.", param="model")
        if self.g.unknown_models == "reject" and not encoding_for_model(model)[1]:
            return openai_error(
                400,
                f"The model `{model}` does not exist or is not served by this gateway.",
                code="model_not_found",
                param="model",
            )
        if self.tracer is None:
            return (await self._admit(request, raw, key, model, body))[0]
        with self.tracer.span(request, model, body) as span:
            response, reservation = await self._admit(request, raw, key, model, body)
            self.tracer.finish(span, response, reservation, key)
            return response

    async def _admit(
        self, request: web.Request, raw: bytes, key: str, model: str, body: dict[str, Any]
    ) -> tuple[web.StreamResponse, Reservation | None]:
        """Reserve the call and forward it, or refuse it: the answer, and the reservation
        (settled once the answer is complete) if the call went upstream."""
        try:
            reservation = self.quota.reserve(key, model, body)
        except QuotaExceeded as exc:
            if exc.decision is not None and exc.decision.reason == "unpriced":
                # not a rate: retrying cannot help, so not a 429
                self.metrics.denials.labels(request.path, "unpriced").inc()
                return openai_error(400, str(exc), code="model_not_priced"), None
            return self._rate_limited(request.path, key, model, exc), None
        except RecordError as exc:
            # nothing is forwarded that could not be recorded (see QuotaClient.reserve)
            return openai_error(400, str(exc), code="invalid_request"), None
        return await self._forward(request, raw, key, model, reservation), reservation

    async def _passthrough(self, request: web.Request, raw: bytes, key: str) -> web.StreamResponse:
        bindings = self.quota.policies.resolve(key, None)
        counted = bool(bindings) and any(
            fnmatch.fnmatchcase(request.path, pattern)
            for pattern in bindings[0].policy.count_routes
        )
        if counted:
            try:
                reservation = self.quota.reserve(
                    key, f"route:{request.path}", prompt_tokens=0, max_output_tokens=0
                )
            except QuotaExceeded as exc:
                return self._rate_limited(request.path, key, None, exc)
            except RecordError as exc:
                return openai_error(400, str(exc), code="invalid_request")
            return await self._forward(request, raw, key, f"route:{request.path}", reservation)
        return await self._forward(request, raw, key, None, None)

    def _rate_limited(
        self, path: str, key: str, model: str | None, exc: QuotaExceeded
    ) -> web.Response:
        self.denied += 1
        d = exc.decision
        reason = "budget" if d is not None and d.by_budget else d.reason if d else "limit"
        self.metrics.denials.labels(self.metrics.route(path), reason).inc()
        now = self.quota.clock()
        headers = ratelimit_headers(self.quota.cache.usage(key, model), now)
        wait = max(exc.retry_after, 0.0)
        headers["retry-after"] = str(max(1, round(wait + 0.499)))
        headers["retry-after-ms"] = str(round(wait * 1000))
        if self.template is not None:
            return self.template.render(wait, headers)
        if d is not None and d.by_budget:
            # a spent budget, as OpenAI answers an exhausted quota (a rate denial stays
            # rate_limit_exceeded): the figures are in dollars
            message = f"You exceeded your budget: {d.explain()}."
            return openai_error(
                429, message, type_="insufficient_quota", code="insufficient_quota",
                headers=headers,
            )  # fmt: skip
        figures = (
            f"Limit {d.ceiling}, Used {d.used}, Requested {d.requested}. "
            if d is not None and d.ceiling is not None
            else ""
        )
        message = (
            f"Rate limit reached for {exc.limit} on key {key}: {figures}"
            f"Please try again in {wait:.3f}s."
        )
        kind = "requests" if exc.limit and "requests" in exc.limit else "tokens"
        return openai_error(429, message, type_=kind, code="rate_limit_exceeded", headers=headers)

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in _DROP_REQUEST and k.lower() != self.g.key_header.lower()
        }
        headers["Accept-Encoding"] = "identity"  # usage is read from the bytes as they pass
        if self.tracer is not None:
            self.tracer.inject(headers)  # the upstream continues the call's span
        if self.g.upstream_api_key is not None:
            headers.pop("api-key", None)
            headers["Authorization"] = f"Bearer {self.g.upstream_api_key.get_secret_value()}"
        return headers

    async def _forward(
        self,
        request: web.Request,
        raw: bytes,
        key: str,
        model: str | None,
        reservation: Reservation | None,
    ) -> web.StreamResponse:
        assert self._session is not None
        url = self.upstream + request.rel_url.path_qs
        started = time.perf_counter()
        route = self.metrics.route(request.path)
        try:
            upstream = await self._session.request(
                request.method, url, data=raw or None, headers=self._upstream_headers(request)
            )
        except TimeoutError:
            self.metrics.upstream_errors.labels(route, "timeout").inc()
            if reservation is not None:
                # The provider may have started on the prompt: count it, estimated.
                reservation.settle(completion_tokens=0, status="error", estimated=True)
            return openai_error(504, "The upstream did not answer in time.", type_="server_error",
                                code="upstream_timeout")  # fmt: skip
        except aiohttp.ClientError as exc:
            self.metrics.upstream_errors.labels(route, "unreachable").inc()
            if reservation is not None:
                reservation.release()  # never reached the provider: nothing to count
            return openai_error(502, f"The upstream could not be reached: {type(exc).__name__}.",
                                type_="server_error", code="upstream_unavailable")  # fmt: skip
        self.forwarded += 1
        self.metrics.upstream_duration.labels(route).observe(time.perf_counter() - started)
        if upstream.status >= 500 or upstream.status == 429:
            kind = "rate_limited" if upstream.status == 429 else "server_error"
            self.metrics.upstream_errors.labels(route, kind).inc()
        try:
            return await self._relay(request, upstream, key, model, reservation)
        finally:
            upstream.release()
            log.info(
                "%s %s key=%s status=%s %.1fms",
                request.method, request.path, key, upstream.status,
                (time.perf_counter() - started) * 1000,
            )  # fmt: skip

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        key: str,
        model: str | None,
        reservation: Reservation | None,
    ) -> web.StreamResponse:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
        sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        if reservation is None or upstream.status >= 400:
            if reservation is not None:
                reservation.settle(prompt_tokens=0, completion_tokens=0, status="error")
            if not sse:
                data = await upstream.read()
                headers.update(self._limit_headers(key, model))
                return web.Response(status=upstream.status, body=data, headers=headers)
        if sse:
            return await self._relay_stream(request, upstream, key, model, reservation, headers)
        assert reservation is not None
        data = await upstream.read()
        record = reservation.settle_body(data)
        headers.update(self._limit_headers(key, model))
        if record.cost_micros is not None:
            # what this call cost, exactly (a stream's is known only after its headers went)
            headers[COST_HEADER] = dollars(record.cost_micros)
            if record.price_version:
                headers[PRICE_VERSION_HEADER] = record.price_version
        if self.g.consumed_tokens_header:
            headers[self.g.consumed_tokens_header] = str(record.total_tokens)
        return web.Response(status=upstream.status, body=data, headers=headers)

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        key: str,
        model: str | None,
        reservation: Reservation | None,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        headers.update(self._limit_headers(key, model))
        if reservation is not None and self.g.consumed_tokens_header:
            headers[self.g.consumed_tokens_header] = str(reservation.prompt_tokens)
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        usage = StreamUsage(model or "gpt-4o")
        finished = False
        try:
            async for chunk in upstream.content.iter_any():
                usage.feed_bytes(chunk)
                await resp.write(chunk)
            finished = True
            await resp.write_eof()
        finally:
            # A caller that disconnects midway (ConnectionResetError, or the handler cancelled)
            # is settled with what was delivered.
            if reservation is not None:
                reservation.settle_stream(usage, cancelled=not finished)
        return resp

    def _limit_headers(self, key: str, model: str | None) -> dict[str, str]:
        rows = self.quota.cache.usage(key, model)
        headers = ratelimit_headers(rows, self.quota.clock())
        if self.g.remaining_tokens_header:
            left = remaining_tokens(rows)
            if left is not None:
                headers[self.g.remaining_tokens_header] = str(left)
        return headers


async def serve(gateway: Gateway, host: str, port: int) -> web.AppRunner:
    """Start serving on ``host:port`` (0 picks a free port); returns the runner."""
    runner = web.AppRunner(gateway.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
