"""OpenTelemetry export, the optional ``quotaflow[otel]`` extra: usage as GenAI metrics, and
spans for the gateway's metered calls, so quotaflow plugs into an existing collector.

Names and attributes are OpenTelemetry's GenAI semantic conventions:

    gen_ai.client.token.usage   histogram, {token}; gen_ai.token.type = input | output,
                                gen_ai.operation.name, gen_ai.provider.name, gen_ai.request.model
    span "<operation> <model>"  kind CLIENT; gen_ai.usage.input_tokens / output_tokens,
                                gen_ai.usage.cache_read.input_tokens, ...cache_creation...,
                                gen_ai.usage.reasoning.output_tokens, error.type

and, where the conventions have no name, quotaflow's own beside them: ``quotaflow.client.cost``
(a counter in USD, exact to the micro-dollar) and ``quotaflow.client.requests`` (by status).

Off by default (``QUOTAFLOW_OTEL__ENABLED``). Usage metrics are taken off the request path, in
the emitter thread, from each record as it is handed to the broker (so a record replayed from the
journal is reported once, when it is sent). Providers are the process's global ones unless given:
a service configures its exporters as it does for the rest of its telemetry; ``quotaflow
gateway`` sets up OTLP export itself (see :func:`configure_otlp`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as genai
from opentelemetry.semconv._incubating.metrics.gen_ai_metrics import GEN_AI_CLIENT_TOKEN_USAGE

from quotaflow.units import MICROS

if TYPE_CHECKING:
    from quotaflow.client import QuotaClient
    from quotaflow.record import RecordedUsage

log = logging.getLogger(__name__)

SCOPE = "quotaflow"
#: The conventions' advised buckets for token counts (powers of 4).
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))
#: A record's ``attrs`` label naming the API called (set by reserve() from the request body).
OPERATION_ATTR = "operation"
DEFAULT_OPERATION = "chat"


def record_attributes(record: RecordedUsage) -> dict[str, str]:
    """The GenAI attributes of one usage record (provider only when known)."""
    attributes = {
        genai.GEN_AI_OPERATION_NAME: record.attrs.get(OPERATION_ATTR, DEFAULT_OPERATION),
        genai.GEN_AI_REQUEST_MODEL: record.model,
    }
    if record.provider:
        attributes[genai.GEN_AI_PROVIDER_NAME] = record.provider
    return attributes


class UsageMetrics:
    """Reports usage records as GenAI metrics; :meth:`observe` takes a batch of records."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = metrics.get_meter(SCOPE, meter_provider=meter_provider)
        self.tokens = meter.create_histogram(
            GEN_AI_CLIENT_TOKEN_USAGE,
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
        )
        self.cost = meter.create_counter(
            "quotaflow.client.cost", unit="USD", description="What the calls cost, priced."
        )
        self.requests = meter.create_counter(
            "quotaflow.client.requests", unit="{request}", description="LLM calls, by status."
        )

    def observe(self, records: Iterable[Any]) -> None:
        input_type = {genai.GEN_AI_TOKEN_TYPE: genai.GenAiTokenTypeValues.INPUT.value}
        output_type = {genai.GEN_AI_TOKEN_TYPE: genai.GenAiTokenTypeValues.COMPLETION.value}
        for record in records:
            attributes = record_attributes(record)
            self.tokens.record(record.prompt_tokens, attributes | input_type)
            self.tokens.record(record.completion_tokens, attributes | output_type)
            if record.cost_micros:
                self.cost.add(record.cost_micros / MICROS, attributes)
            self.requests.add(record.requests, attributes | {"quotaflow.status": record.status})


def export_usage(
    client: QuotaClient, meter_provider: metrics.MeterProvider | None = None
) -> UsageMetrics:
    """Report every usage record ``client`` sends as GenAI metrics (opens the client)."""
    client.open()
    usage = UsageMetrics(meter_provider)
    assert client.emitter is not None
    client.emitter.observers.append(usage.observe)
    return usage


def call_span_attributes(record: RecordedUsage) -> dict[str, Any]:
    """A metered call's usage, as the GenAI span attributes."""
    attributes: dict[str, Any] = dict(record_attributes(record))
    attributes[genai.GEN_AI_USAGE_INPUT_TOKENS] = record.prompt_tokens
    attributes[genai.GEN_AI_USAGE_OUTPUT_TOKENS] = record.completion_tokens
    for name, value in (
        (genai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, record.cached_prompt_tokens),
        (genai.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, record.cache_write_tokens),
        (genai.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, record.reasoning_tokens),
    ):
        if value:
            attributes[name] = value
    if record.cost_micros is not None:
        attributes["quotaflow.cost_usd"] = record.cost_micros / MICROS
    attributes["quotaflow.usage_estimated"] = record.estimated
    attributes["quotaflow.record_id"] = record.id
    return attributes


def tracer(tracer_provider: trace.TracerProvider | None = None) -> trace.Tracer:
    return trace.get_tracer(SCOPE, tracer_provider=tracer_provider)


def configure_otlp(service_name: str) -> None:
    """Global OTLP exporters for a quotaflow program (the gateway), configured by the standard
    ``OTEL_EXPORTER_OTLP_*`` variables; left alone if the process already has providers."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:  # pragma: no cover - the extra installs it
        log.warning("otel: opentelemetry-exporter-otlp-proto-http is not installed; nothing sent")
        return
    resource = Resource.create({"service.name": service_name})
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    if type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider":
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
