"""The gateway's HTTP side: an aiohttp reverse proxy that meters LLM API calls.

Per metered call (the routes of :mod:`quotaflow_producers.gateway.apis`: OpenAI chat,
completions, embeddings, Responses and images; Anthropic Messages): find the counter key,
reserve the call in the embedded :class:`QuotaClient` (no I/O), answer 429 at once in the
caller's API's own shape if it does not fit, else forward it to the route's upstream and settle
the reservation with the usage the upstream reports (for streams: the usage events, or the
relayed content counted), so every usage record carries the provider's own figures. Streams are
relayed chunk by chunk, never buffered. Other ``/v1/*`` routes pass through, counted as requests
where the key's policy lists them in ``count_routes``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from quotaflow._exceptions import ConfigError, QuotaExceeded, RecordError
from quotaflow.apis import (
    APIS,
    DEFAULT_IMAGE_MODEL,
    MeteredApi,
    dialect_of,
    read_body,
    settle_answer,
)
from quotaflow.client import QuotaClient
from quotaflow.keys import bearer_token, same_secret
from quotaflow.prices import dollars
from quotaflow.record import looks_like_secret
from quotaflow.reservation import Reservation
from quotaflow.settings import QuotaflowSettings
from quotaflow.streaming import StreamUsage
from quotaflow.tokens import encoding_for_model, image_count
from quotaflow_producers.gateway.apis import error, limit_headers
from quotaflow_producers.gateway.keys import resolve_key
from quotaflow_producers.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from quotaflow_producers.gateway.responses import RateLimitTemplate, remaining_tokens

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from quotaflow_producers.gateway.tracing import CallTracer

log = logging.getLogger(__name__)

METERED = tuple(APIS)
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
        # longest prefix first: /v1/messages/count_tokens before /v1/messages before /v1
        self.routes = sorted(
            ((prefix, url.rstrip("/")) for prefix, url in self.g.upstreams.items()),
            key=lambda item: -len(item[0]),
        )
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

            self.tracer = CallTracer(tracer_provider)
        self._metrics_token = (
            self.g.metrics_token.get_secret_value() if self.g.metrics_token else None
        )

    def upstream_for(self, path: str) -> str:
        """The base URL a path is forwarded to: the longest matching route, else ``upstream``."""
        for prefix, url in self.routes:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return url
        return self.upstream

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
        """Liveness: the event loop answers (and which process, where several share a port)."""
        return web.json_response({"ok": True, "pid": os.getpid(), "forwarded": self.forwarded,
                                  "denied": self.denied})  # fmt: skip

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
            return error("openai", 401, "The metrics need the gateway's metrics token.",
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
        dialect = dialect_of(request.path)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(
                dialect, 413,
                f"Request body exceeds the gateway's limit of {self.g.max_body_bytes} bytes.",
                code="request_too_large",
            )  # fmt: skip
        key = resolve_key(request.headers, request.remote, self.g)
        if key is None:
            return error(
                dialect, 401,
                "No counter key: send an API key, or the "
                f"{self.g.key_header} header, as the gateway is configured to expect.",
                code="missing_key",
            )  # fmt: skip
        if looks_like_secret(key):
            # A credential sent as a counter key: refused before the upstream (it would be
            # served and then could not be recorded), and never repeated or logged.
            return error(
                dialect, 400,
                f"The counter key looks like an API secret; send an id in {self.g.key_header}, "
                "never a credential.",
                code="invalid_counter_key",
            )  # fmt: skip
        api = APIS.get(request.path)
        if request.method == "POST" and api is not None:
            return await self._metered(request, raw, key, api)
        return await self._passthrough(request, raw, key)

    async def _metered(
        self, request: web.Request, raw: bytes, key: str, api: MeteredApi
    ) -> web.StreamResponse:
        dialect = api.dialect
        try:
            body = read_body(api, raw, request.headers.get("Content-Type", ""))
        except ValueError as exc:
            return error(dialect, 400, str(exc))
        model = body.get("model", DEFAULT_IMAGE_MODEL if api.images else None)
        if not isinstance(model, str) or not model:
            message = (
                "model: Field required" if dialect == "anthropic"
                else "You must provide a model parameter."
            )  # fmt: skip
            return error(dialect, 400, message, param="model")
        if (
            dialect == "openai"
            and not api.images
            and self.g.unknown_models == "reject"
            and not encoding_for_model(model)[1]
        ):
            return error(
                dialect, 400,
                f"The model `{model}` does not exist or is not served by this gateway.",
                code="model_not_found", param="model",
            )  # fmt: skip
        if self.tracer is None:
            return (await self._admit(request, raw, key, model, body, api))[0]
        with self.tracer.span(request, model, api.kind, self.upstream_for(request.path)) as span:
            response, reservation = await self._admit(request, raw, key, model, body, api)
            self.tracer.finish(span, response, reservation, key)
            return response

    async def _admit(
        self,
        request: web.Request,
        raw: bytes,
        key: str,
        model: str,
        body: dict[str, Any],
        api: MeteredApi,
    ) -> tuple[web.StreamResponse, Reservation | None]:
        """Reserve the call and forward it, or refuse it: the answer, and the reservation
        (settled once the answer is complete) if the call went upstream."""
        dialect = api.dialect
        try:
            images = image_count(body) if api.images else 0
            if dialect == "anthropic" and not isinstance(body.get("max_tokens"), int):
                raise ValueError("max_tokens: Field required")
        except ValueError as exc:
            return error(dialect, 400, str(exc)), None
        prompt = await self._counted_prompt(request, api, body)
        try:
            reservation = self.quota.reserve(
                key, model, body, kind=api.kind, images=images, provider=api.provider,
                prompt_tokens=prompt,
            )  # fmt: skip
        except QuotaExceeded as exc:
            if exc.decision is not None and exc.decision.reason == "unpriced":
                # not a rate: retrying cannot help, so not a 429
                self.metrics.denials.labels(request.path, "unpriced").inc()
                return error(dialect, 400, str(exc), code="model_not_priced"), None
            return self._rate_limited(request.path, key, model, exc), None
        except RecordError as exc:
            # nothing is forwarded that could not be recorded (see QuotaClient.reserve)
            return error(dialect, 400, str(exc), code="invalid_request"), None
        return await self._forward(request, raw, key, model, reservation, api), reservation

    async def _counted_prompt(
        self, request: web.Request, api: MeteredApi, body: dict[str, Any]
    ) -> int | None:
        """Anthropic's own count of the prompt (``/v1/messages/count_tokens``) where configured,
        else None: the local estimate. Its tokenizer is not public; the local count is marked
        estimated. Any failure falls back to the estimate."""
        if api.kind != "messages" or not self.g.anthropic_count_tokens:
            return None
        assert self._session is not None
        wanted = ("model", "messages", "system", "tools", "tool_choice", "thinking")
        payload = {k: body[k] for k in wanted if k in body}
        url = self.upstream_for(request.path) + "/v1/messages/count_tokens"
        try:
            async with self._session.post(
                url, json=payload, headers=self._upstream_headers(request, dialect="anthropic")
            ) as resp:
                if resp.status != 200:
                    return None
                counted = (await resp.json()).get("input_tokens")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return None
        return counted if isinstance(counted, int) and counted >= 0 else None

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
                return error(dialect_of(request.path), 400, str(exc), code="invalid_request")
            return await self._forward(
                request, raw, key, f"route:{request.path}", reservation, None
            )
        return await self._forward(request, raw, key, None, None, None)

    def _rate_limited(
        self, path: str, key: str, model: str | None, exc: QuotaExceeded
    ) -> web.Response:
        self.denied += 1
        dialect = dialect_of(path)
        d = exc.decision
        reason = "budget" if d is not None and d.by_budget else d.reason if d else "limit"
        self.metrics.denials.labels(self.metrics.route(path), reason).inc()
        now = self.quota.clock()
        headers = limit_headers(dialect, self.quota.cache.usage(key, model), now)
        wait = max(exc.retry_after, 0.0)
        headers["retry-after"] = str(max(1, round(wait + 0.499)))
        headers["retry-after-ms"] = str(round(wait * 1000))
        if self.template is not None:
            return self.template.render(wait, headers)
        if d is not None and d.by_budget:
            # a spent budget, as OpenAI answers an exhausted quota (a rate denial stays
            # rate_limit_exceeded): the figures are in dollars
            message = f"You exceeded your budget: {d.explain()}."
            return error(
                dialect, 429, message, type_="insufficient_quota", code="insufficient_quota",
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
        return error(dialect, 429, message, type_=kind, code="rate_limit_exceeded", headers=headers)

    def _upstream_headers(self, request: web.Request, dialect: str = "openai") -> dict[str, str]:
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in _DROP_REQUEST and k.lower() != self.g.key_header.lower()
        }
        headers["Accept-Encoding"] = "identity"  # usage is read from the bytes as they pass
        if self.tracer is not None:
            self.tracer.inject(headers)  # the upstream continues the call's span
        if self.g.upstream_api_key is not None and dialect == "openai":
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
        api: MeteredApi | None,
    ) -> web.StreamResponse:
        assert self._session is not None
        dialect = dialect_of(request.path)
        url = self.upstream_for(request.path) + request.rel_url.path_qs
        started = time.perf_counter()
        route = self.metrics.route(request.path)
        try:
            upstream = await self._session.request(
                request.method, url, data=raw or None,
                headers=self._upstream_headers(request, dialect),
            )  # fmt: skip
        except TimeoutError:
            self.metrics.upstream_errors.labels(route, "timeout").inc()
            if reservation is not None:
                # The provider may have started on the prompt: count it, estimated.
                reservation.settle(completion_tokens=0, images=0, status="error", estimated=True)
            return error(dialect, 504, "The upstream did not answer in time.",
                         type_="server_error", code="upstream_timeout")  # fmt: skip
        except aiohttp.ClientError as exc:
            self.metrics.upstream_errors.labels(route, "unreachable").inc()
            if reservation is not None:
                reservation.release()  # never reached the provider: nothing to count
            return error(dialect, 502, f"The upstream could not be reached: {type(exc).__name__}.",
                         type_="server_error", code="upstream_unavailable")  # fmt: skip
        self.forwarded += 1
        self.metrics.upstream_duration.labels(route).observe(time.perf_counter() - started)
        if upstream.status >= 500 or upstream.status == 429:
            kind = "rate_limited" if upstream.status == 429 else "server_error"
            self.metrics.upstream_errors.labels(route, kind).inc()
        try:
            return await self._relay(request, upstream, key, model, reservation, api)
        finally:
            upstream.release()
            if self.g.access_log:
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
        api: MeteredApi | None,
    ) -> web.StreamResponse:
        dialect = dialect_of(request.path)
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
        sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        if reservation is None or upstream.status >= 400:
            if reservation is not None:
                reservation.settle(prompt_tokens=0, completion_tokens=0, images=0, status="error")
            if not sse:
                data = await upstream.read()
                headers.update(self._limit_headers(dialect, key, model))
                return web.Response(status=upstream.status, body=data, headers=headers)
        if sse:
            return await self._relay_stream(
                request, upstream, key, model, reservation, headers, dialect
            )
        assert reservation is not None
        data = await upstream.read()
        record = settle_answer(reservation, data, api)
        headers.update(self._limit_headers(dialect, key, model))
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
        dialect: str,
    ) -> web.StreamResponse:
        headers.update(self._limit_headers(dialect, key, model))
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

    def _limit_headers(self, dialect: str, key: str, model: str | None) -> dict[str, str]:
        rows = self.quota.cache.usage(key, model)
        headers = limit_headers("anthropic" if dialect == "anthropic" else "openai", rows,
                                self.quota.clock())  # fmt: skip
        if self.g.remaining_tokens_header:
            left = remaining_tokens(rows)
            if left is not None:
                headers[self.g.remaining_tokens_header] = str(left)
        return headers


async def serve(
    gateway: Gateway, host: str, port: int, *, reuse_port: bool = False
) -> web.AppRunner:
    """Start serving on ``host:port`` (0 picks a free port); returns the runner. With
    ``reuse_port`` several gateway processes share the port (the kernel spreads connections)."""
    runner = web.AppRunner(gateway.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
    return runner
