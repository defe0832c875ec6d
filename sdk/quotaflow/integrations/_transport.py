"""Quota enforcement inside an LLM client's HTTP transport: what the ``openai`` and
``anthropic`` integrations share (both clients are built on httpx, or its fork httpx2: the
transport plugs into whichever the installed client uses; no monkeypatching).

Before a metered request (a route of :mod:`quotaflow.apis`) leaves, the call is reserved (the
prompt counted locally plus the output ceiling, and images); a denial never reaches the network
and comes back as an HTTP 429 in the client's own API shape, with ``retry-after`` and
``x-should-retry: false`` (so the client raises its ``RateLimitError`` and does not retry by
itself). After the call the reservation is settled with the provider's ``usage``, or for streams
with the usage events or the counted content, and for a stream closed early with what was
delivered.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from quotaflow._exceptions import QuotaExceeded, RecordError
from quotaflow.apis import DEFAULT_IMAGE_MODEL, MeteredApi, api_for, read_body, settle_answer
from quotaflow.client import QuotaClient
from quotaflow.reservation import Reservation
from quotaflow.streaming import StreamUsage
from quotaflow.tokens import image_count

KeyFn = Callable[[dict[str, Any]], str]
#: The body of a 429 in the client's API shape, for a denial.
DenialBody = Callable[[QuotaExceeded], dict[str, Any]]


def httpx_of(client_module: Any) -> Any:
    """The httpx module (httpx or httpx2) the client library builds on."""
    return sys.modules[client_module.DefaultHttpxClient.__mro__[1].__module__.split(".")[0]]


def metering_http_client(
    client_module: Any, is_async: bool, meter: Meter, transport: Any = None
) -> Any:
    """The client library's own default HTTP client, with the metering transport inside."""
    hx = httpx_of(client_module)
    sync_cls, async_cls = _transports(hx)
    if is_async:
        inner = transport or hx.AsyncHTTPTransport()
        return client_module.DefaultAsyncHttpxClient(transport=async_cls(inner, meter))
    inner = transport or hx.HTTPTransport()
    return client_module.DefaultHttpxClient(transport=sync_cls(inner, meter))


def retry_after(error: BaseException) -> float | None:
    """Seconds to wait, from a ``RateLimitError``'s headers (ours or the provider's)."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    if "retry-after-ms" in headers:
        return float(headers["retry-after-ms"]) / 1000
    if "retry-after" in headers:
        try:
            return float(headers["retry-after"])
        except ValueError:
            return None
    return None


class Meter:
    """What both transports share: admission before the call, settlement after it."""

    def __init__(
        self, quota: QuotaClient, key: str | KeyFn, deny: DenialBody, provider: str | None = None
    ) -> None:
        self.quota = quota
        self.key = key
        self.deny = deny
        #: The provider of every call (its usage shape, and the records' ``provider``).
        self.provider = provider

    def admit(self, hx: Any, request: Any) -> tuple[Reservation | None, Any, MeteredApi | None]:
        """``(reservation, None, api)`` to go ahead, ``(None, response, api)`` to answer 429
        at once, ``(None, None, None)`` for a request that is not metered (or not ours to
        judge: the provider answers a malformed one)."""
        api = api_for(request.url.path) if request.method == "POST" else None
        if api is None:
            return None, None, None
        try:
            body = read_body(api, request.content or b"{}", request.headers.get("content-type", ""))
            images = image_count(body) if api.images else 0
        except ValueError:
            return None, None, None
        model = body.get("model", DEFAULT_IMAGE_MODEL if api.images else None)
        if not isinstance(model, str) or not model:
            return None, None, None
        key = self.key(body) if callable(self.key) else self.key
        try:
            reservation = self.quota.reserve(
                key, model, body, kind=api.kind, images=images,
                provider=self.provider or api.provider,
            )  # fmt: skip
        except QuotaExceeded as exc:
            return None, self._denied(hx, exc, request), api
        except RecordError:
            return None, None, None
        # Identity encoding lets the metering stream read usage from the raw bytes.
        request.headers["accept-encoding"] = "identity"
        return reservation, None, api

    def _denied(self, hx: Any, exc: QuotaExceeded, request: Any) -> Any:
        wait = max(exc.retry_after, 0.0)
        return hx.Response(
            429,
            headers={
                "content-type": "application/json",
                "retry-after": str(max(1, math.ceil(wait))),
                "retry-after-ms": str(round(wait * 1000)),
                "x-should-retry": "false",
            },
            content=json.dumps(self.deny(exc)).encode(),
            request=request,
        )


class _Settler:
    """Feeds passing bytes to the right accumulator and settles exactly once."""

    def __init__(self, reservation: Reservation, sse: bool, api: MeteredApi | None) -> None:
        self.reservation = reservation
        self.api = api
        self.stream_usage = StreamUsage(reservation.model) if sse else None
        self.body: list[bytes] = []
        self.finished = False

    def feed(self, chunk: bytes) -> None:
        if self.stream_usage is not None:
            self.stream_usage.feed_bytes(chunk)
        else:
            self.body.append(chunk)

    def complete(self) -> None:
        self.finished = True
        if self.stream_usage is not None:
            self.reservation.settle_stream(self.stream_usage)
            return
        settle_answer(self.reservation, b"".join(self.body), self.api)

    def closed(self) -> None:
        if self.finished or self.reservation.settled:
            return
        if self.stream_usage is not None:
            self.reservation.settle_stream(self.stream_usage, cancelled=True)
        else:
            self.reservation.settle(status="cancelled")


def _settled_response(
    hx: Any, stream_cls: Any, reservation: Reservation, api: MeteredApi | None, request: Any,
    response: Any,
) -> Any:  # fmt: skip
    if response.status_code >= 400:
        # Refused by the provider: one request, no tokens, no images.
        reservation.settle(prompt_tokens=0, completion_tokens=0, images=0, status="error")
        return response
    sse = response.headers.get("content-type", "").startswith("text/event-stream")
    return hx.Response(
        response.status_code,
        headers=response.headers,
        stream=stream_cls(response.stream, _Settler(reservation, sse, api)),
        request=request,
        extensions=response.extensions,
    )


@functools.cache
def _transports(hx: Any) -> tuple[type, type]:
    """The sync and async metering transports, built on the client's httpx module."""

    class Metered(hx.SyncByteStream):
        def __init__(self, inner: Any, settler: _Settler) -> None:
            self._inner = inner
            self._settler = settler

        def __iter__(self) -> Iterator[bytes]:
            for chunk in self._inner:
                self._settler.feed(chunk)
                yield chunk
            self._settler.complete()

        def close(self) -> None:
            try:
                self._inner.close()
            finally:
                self._settler.closed()

    class AsyncMetered(hx.AsyncByteStream):
        def __init__(self, inner: Any, settler: _Settler) -> None:
            self._inner = inner
            self._settler = settler

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self._inner:
                self._settler.feed(chunk)
                yield chunk
            self._settler.complete()

        async def aclose(self) -> None:
            try:
                await self._inner.aclose()
            finally:
                self._settler.closed()

    class QuotaTransport(hx.BaseTransport):
        """Sync metering transport around ``inner``."""

        def __init__(self, inner: Any, meter: Meter) -> None:
            self._inner = inner
            self._meter = meter

        def handle_request(self, request: Any) -> Any:
            request.read()
            reservation, denial, api = self._meter.admit(hx, request)
            if denial is not None:
                return denial
            if reservation is None:
                return self._inner.handle_request(request)
            try:
                response = self._inner.handle_request(request)
            except BaseException:
                reservation.settle(prompt_tokens=0, completion_tokens=0, images=0,
                                   status="error")  # fmt: skip
                raise
            return _settled_response(hx, Metered, reservation, api, request, response)

        def close(self) -> None:
            self._inner.close()

    class AsyncQuotaTransport(hx.AsyncBaseTransport):
        """Async metering transport around ``inner``."""

        def __init__(self, inner: Any, meter: Meter) -> None:
            self._inner = inner
            self._meter = meter

        async def handle_async_request(self, request: Any) -> Any:
            await request.aread()
            reservation, denial, api = self._meter.admit(hx, request)
            if denial is not None:
                return denial
            if reservation is None:
                return await self._inner.handle_async_request(request)
            try:
                response = await self._inner.handle_async_request(request)
            except BaseException:
                reservation.settle(prompt_tokens=0, completion_tokens=0, images=0,
                                   status="error")  # fmt: skip
                raise
            return _settled_response(hx, AsyncMetered, reservation, api, request, response)

        async def aclose(self) -> None:
            await self._inner.aclose()

    return QuotaTransport, AsyncQuotaTransport
