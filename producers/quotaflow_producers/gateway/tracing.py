"""Spans of the gateway's metered calls (OpenTelemetry GenAI conventions; ``quotaflow[otel]``).

One CLIENT span per metered call, named ``<operation> <model>``: it continues the caller's trace
(``traceparent`` in), the upstream continues it (``traceparent`` out), and when the call is
settled it carries the usage the provider reported, the call's cost and the quota decision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as genai
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from quotaflow.otel import call_span_attributes, tracer
from quotaflow.reservation import Reservation
from quotaflow.tokens import operation_name


class CallTracer:
    def __init__(self, tracer_provider: trace.TracerProvider | None) -> None:
        self.tracer = tracer(tracer_provider)

    @contextlib.contextmanager
    def span(self, request: web.Request, model: str, kind: str, upstream: str) -> Iterator[Span]:
        operation = operation_name({}, kind)
        parts = urlsplit(upstream)
        attributes: dict[str, Any] = {
            genai.GEN_AI_OPERATION_NAME: operation,
            genai.GEN_AI_REQUEST_MODEL: model,
            "quotaflow.route": request.path,
            "server.address": parts.hostname or "",
            "server.port": parts.port or (443 if parts.scheme == "https" else 80),
        }
        with self.tracer.start_as_current_span(
            f"{operation} {model}",
            context=propagate.extract(request.headers),
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
        ) as span:
            yield span

    @staticmethod
    def inject(headers: MutableMapping[str, str]) -> None:
        """Put the current span's trace context on the upstream request."""
        propagate.inject(headers)

    @staticmethod
    def finish(
        span: Span, response: web.StreamResponse, reservation: Reservation | None, key: str
    ) -> None:
        span.set_attribute("http.response.status_code", response.status)
        span.set_attribute("quotaflow.key", key)
        if reservation is None:  # refused before the upstream
            span.set_attribute("quotaflow.decision", "denied")
        else:
            span.set_attribute("quotaflow.decision", "allowed")
            if reservation.record is not None:
                span.set_attributes(call_span_attributes(reservation.record))
        if response.status >= 400:
            span.set_attribute("error.type", str(response.status))
            span.set_status(Status(StatusCode.ERROR))
