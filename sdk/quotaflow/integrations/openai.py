"""Quota enforcement for the official ``openai`` client, through its HTTP transport.

    from openai import OpenAI
    from quotaflow.integrations.openai import instrument, retry_after

    client = instrument(OpenAI(), quota=quota_client, key="team-alpha")
    try:
        client.chat.completions.create(model="gpt-4o", messages=[...])
    except openai.RateLimitError as err:
        wait = retry_after(err)

``instrument`` returns a copy of the client whose HTTP client routes chat completions,
completions and embeddings through a metering transport: before the request leaves, it reserves
the call (prompt counted locally plus the output ceiling); a denial never reaches the network
and comes back as the client's own ``RateLimitError`` (HTTP 429 with ``retry-after`` and
``x-should-retry: false``, so the client does not retry it by itself). After the call it settles
the reservation with the provider's ``usage``, or for streams with the final usage chunk or the
counted content, and for a stream closed early with what was delivered. Works for ``OpenAI`` and
``AsyncOpenAI``, streaming or not; no monkeypatching.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import openai

from quotaflow._exceptions import QuotaExceeded, RecordError
from quotaflow.client import QuotaClient
from quotaflow.reservation import Reservation
from quotaflow.streaming import StreamUsage

KeyFn = Callable[[dict[str, Any]], str]
METERED_SUFFIXES = ("/chat/completions", "/completions", "/embeddings")

# openai 1.x builds on httpx, later releases on its fork httpx2 (same API): use whichever the
# installed client uses, so our transport plugs into its HTTP client.
hx: Any = sys.modules[openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0]]


def instrument(client: Any, *, quota: QuotaClient, key: str | KeyFn, transport: Any = None) -> Any:
    """A copy of ``client`` (``OpenAI`` or ``AsyncOpenAI``) that enforces and records quota.

    ``key`` is the counter key, or a function of the request body that returns it. ``transport``
    is the inner HTTP transport (default: a plain one).
    """
    meter = _Meter(quota, key)
    http: Any
    if isinstance(client, openai.AsyncOpenAI):
        inner = transport or hx.AsyncHTTPTransport()
        http = openai.DefaultAsyncHttpxClient(transport=AsyncQuotaTransport(inner, meter))
    else:
        inner = transport or hx.HTTPTransport()
        http = openai.DefaultHttpxClient(transport=QuotaTransport(inner, meter))
    return client.with_options(http_client=http)


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


class _Meter:
    """What both transports share: admission before the call, settlement after it."""

    def __init__(self, quota: QuotaClient, key: str | KeyFn) -> None:
        self.quota = quota
        self.key = key

    def admit(self, request: Any) -> tuple[Reservation | None, Any]:
        """``(reservation, None)`` to go ahead, ``(None, response)`` to answer 429 at once,
        ``(None, None)`` for a route that is not metered."""
        if request.method != "POST" or not request.url.path.endswith(METERED_SUFFIXES):
            return None, None
        try:
            body = json.loads(request.content or b"{}")
        except ValueError:
            return None, None  # not ours to judge; the provider will answer 400
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            return None, None
        key = self.key(body) if callable(self.key) else self.key
        try:
            reservation = self.quota.reserve(key, model, body)
        except QuotaExceeded as exc:
            return None, _denied(exc, request)
        except RecordError:
            return None, None
        # Identity encoding lets the metering stream read usage from the raw bytes.
        request.headers["accept-encoding"] = "identity"
        return reservation, None

    def wrap(self, reservation: Reservation, request: Any, response: Any, is_async: bool) -> Any:
        if response.status_code >= 400:
            # Refused by the provider: one request, no tokens.
            reservation.settle(prompt_tokens=0, completion_tokens=0, status="error")
            return response
        sse = response.headers.get("content-type", "").startswith("text/event-stream")
        wrapper = (_AsyncMetered if is_async else _Metered)(response.stream, reservation, sse)
        return hx.Response(
            response.status_code,
            headers=response.headers,
            stream=wrapper,
            request=request,
            extensions=response.extensions,
        )


def _denied(exc: QuotaExceeded, request: Any) -> Any:
    wait = max(exc.retry_after, 0.0)
    kind = "requests" if exc.limit and "requests" in exc.limit else "tokens"
    body = {
        "error": {
            "message": f"Rate limit reached (quotaflow): {exc}",
            "type": kind,
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    return hx.Response(
        429,
        headers={
            "content-type": "application/json",
            "retry-after": str(math.ceil(wait)),
            "retry-after-ms": str(round(wait * 1000)),
            "x-should-retry": "false",
        },
        content=json.dumps(body).encode(),
        request=request,
    )


class _Settler:
    """Feeds passing bytes to the right accumulator and settles exactly once."""

    def __init__(self, reservation: Reservation, sse: bool) -> None:
        self.reservation = reservation
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
        self.reservation.settle_body(b"".join(self.body))

    def closed(self) -> None:
        if self.finished or self.reservation.settled:
            return
        if self.stream_usage is not None:
            self.reservation.settle_stream(self.stream_usage, cancelled=True)
        else:
            self.reservation.settle(status="cancelled")


class _Metered(hx.SyncByteStream):
    def __init__(self, inner: Any, reservation: Reservation, sse: bool) -> None:
        self._inner = inner
        self._settler = _Settler(reservation, sse)

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


class _AsyncMetered(hx.AsyncByteStream):
    def __init__(self, inner: Any, reservation: Reservation, sse: bool) -> None:
        self._inner = inner
        self._settler = _Settler(reservation, sse)

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

    def __init__(self, inner: Any, meter: _Meter) -> None:
        self._inner = inner
        self._meter = meter

    def handle_request(self, request: Any) -> Any:
        request.read()
        reservation, denial = self._meter.admit(request)
        if denial is not None:
            return denial
        if reservation is None:
            return self._inner.handle_request(request)
        try:
            response = self._inner.handle_request(request)
        except BaseException:
            reservation.settle(prompt_tokens=0, completion_tokens=0, status="error")
            raise
        return self._meter.wrap(reservation, request, response, is_async=False)

    def close(self) -> None:
        self._inner.close()


class AsyncQuotaTransport(hx.AsyncBaseTransport):
    """Async metering transport around ``inner``."""

    def __init__(self, inner: Any, meter: _Meter) -> None:
        self._inner = inner
        self._meter = meter

    async def handle_async_request(self, request: Any) -> Any:
        await request.aread()
        reservation, denial = self._meter.admit(request)
        if denial is not None:
            return denial
        if reservation is None:
            return await self._inner.handle_async_request(request)
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            reservation.settle(prompt_tokens=0, completion_tokens=0, status="error")
            raise
        return self._meter.wrap(reservation, request, response, is_async=True)

    async def aclose(self) -> None:
        await self._inner.aclose()
