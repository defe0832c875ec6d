"""What operators watch, from running parts: a real worker process and a gateway in front of a
provider-like upstream, usage through the real broker. Probes, the gateway's /metrics, its
OpenTelemetry spans, usage as GenAI metrics, and every metric the Grafana dashboard and the
alert rules use found in a scrape of both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from quotaflow import QuotaClient
from quotaflow.otel import export_usage
from quotaflow.settings import GatewaySettings, QuotaflowSettings
from quotaflow_producers.gateway.runner import GatewayThread
from quotaflow_producers.testing import OpenAIStub
from quotaflow_stream.harness import WorkerProcess, free_port
from tests.support import wait_for
from tests.support.gateways import flush
from tests.support.promql import used_metrics

pytestmark = pytest.mark.integration

PIPELINE_POLICIES = """
version: 1
policies:
  - {name: roomy, keys: ["tele-*"], max_staleness: 600, alerts: [0.5],
     limits: {requests_per_minute: 100000, tokens_per_minute: 1000000, cost_per_day: 50.0}}
  - {name: tight, keys: ["tight-*"], max_staleness: 600, limits: {requests_per_minute: 1}}
"""
METRICS_TOKEN = "metrics-token-for-tests"
MESSAGES = [{"role": "user", "content": "How are quotas kept?"}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Telemetry:
    def __init__(self, gateway: GatewayThread, spans: InMemorySpanExporter,
                 reader: InMemoryMetricReader) -> None:  # fmt: skip
        self.gateway = gateway
        self.spans = spans
        self.reader = reader

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.base_url, api_key="sk-test", max_retries=0,
                             default_headers={"x-quotaflow-key": key})  # fmt: skip

    def flush(self) -> None:
        flush(self.gateway)

    def scrape(self) -> dict[str, float]:
        r = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert r.status_code == 200, r.text
        return samples(r.text)


def samples(text: str) -> dict[str, float]:
    """Every sample of a scrape, as 'name{label="v",...}' -> value (labels sorted)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture(scope="module")
def telemetry(
    settings: QuotaflowSettings, worker: WorkerProcess, stub: OpenAIStub
) -> Iterator[Telemetry]:
    gw_settings = settings.model_copy(deep=True)
    gw_settings.gateway = GatewaySettings.model_validate({
        **settings.gateway.model_dump(),
        "upstream": f"http://127.0.0.1:{stub.port}", "listen_port": free_port(),
        "key_sources": ["header"], "metrics_token": METRICS_TOKEN,
    })  # fmt: skip
    gw_settings.client.source = "gateway-telemetry"
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    quota = QuotaClient(gw_settings).open()
    export_usage(quota, MeterProvider(metric_readers=[reader]))
    assert quota.wait_ready(30)
    gateway = GatewayThread(gw_settings, quota, tracer_provider=tracer_provider).start()
    yield Telemetry(gateway, spans, reader)
    gateway.stop()
    quota.close()


def test_probes_answer_without_a_token(telemetry: Telemetry, worker: WorkerProcess) -> None:
    for base in (telemetry.url, worker.base_url):
        assert httpx.get(base + "/healthz").status_code == 200
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True, base


def test_gateway_metrics_count_routes_statuses_denials_and_upstream_errors(
    telemetry: Telemetry, stub: OpenAIStub
) -> None:
    before = telemetry.scrape()
    chat = "/v1/chat/completions"
    c = telemetry.client("tele-metrics")
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    tight = telemetry.client("tight-metrics")
    tight.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):  # the gateway's own denial
        tight.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):  # the provider's 429, relayed
        c.chat.completions.create(model="stub-429", messages=MESSAGES)
    # a caller's own path is "other": it cannot mint series
    assert httpx.get(telemetry.url + "/v1/made-up-path-123", headers={"x-quotaflow-key": "tele-x"})
    after = telemetry.scrape()

    def delta(sample: str) -> float:
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    assert delta(f'quotaflow_gateway_requests_total{{route="{chat}",status="200"}}') == 2
    assert delta(f'quotaflow_gateway_requests_total{{route="{chat}",status="429"}}') == 2
    assert delta(f'quotaflow_gateway_denials_total{{reason="limit",route="{chat}"}}') == 1
    assert (
        delta(f'quotaflow_gateway_upstream_errors_total{{kind="rate_limited",route="{chat}"}}') == 1
    )
    assert (
        delta(f'quotaflow_gateway_upstream_errors_total{{kind="server_error",route="{chat}"}}') == 0
    )
    assert delta(f'quotaflow_gateway_request_duration_seconds_count{{route="{chat}"}}') == 4
    # three calls reached the upstream, the denied one never did
    assert delta(f'quotaflow_gateway_upstream_duration_seconds_count{{route="{chat}"}}') == 3
    assert not [s for s in after if "made-up-path" in s]
    assert delta('quotaflow_gateway_requests_total{route="other",status="404"}') == 1
    # the embedded client's view of the stream, per policy
    assert after['quotaflow_sdk_stale{policy="roomy"}'] == 0
    assert 0 <= after["quotaflow_sdk_stream_silence_seconds"] < 5
    assert after['quotaflow_policy_max_staleness_seconds{policy="tight"}'] == 600


def test_gateway_metrics_need_the_token_when_one_is_set(telemetry: Telemetry) -> None:
    assert httpx.get(telemetry.url + "/metrics").status_code == 401
    wrong = httpx.get(telemetry.url + "/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "quotaflow_" not in wrong.text


def test_metered_calls_are_genai_spans_that_continue_the_callers_trace(
    telemetry: Telemetry, stub: OpenAIStub
) -> None:
    telemetry.spans.clear()
    parent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
    r = httpx.post(
        telemetry.gateway.base_url + "/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES},
        headers={"x-quotaflow-key": "tele-trace", "traceparent": parent},
    )
    assert r.status_code == 200
    reported = stub.reported[-1]
    (span,) = telemetry.spans.get_finished_spans()
    assert span.name == "chat gpt-4o" and span.kind is SpanKind.CLIENT
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == CALLER_SPAN
    a = span.attributes or {}
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "gpt-4o"
    assert a["gen_ai.usage.input_tokens"] == reported["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == reported["completion_tokens"]
    assert a["quotaflow.cost_usd"] > 0 and a["quotaflow.decision"] == "allowed"
    assert a["server.address"] == "127.0.0.1" and a["http.response.status_code"] == 200
    # the upstream got the gateway's span as its parent
    assert stub.traceparents[-1] == f"00-{TRACE_ID}-{format(span.context.span_id, '016x')}-01"

    telemetry.spans.clear()
    tight = telemetry.client("tight-trace")
    tight.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    upstream_calls = len(stub.reported)
    with pytest.raises(openai.RateLimitError):
        tight.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(stub.reported) == upstream_calls
    denied = telemetry.spans.get_finished_spans()[-1]
    d = denied.attributes or {}
    assert d["quotaflow.decision"] == "denied" and d["error.type"] == "429"
    assert "gen_ai.usage.input_tokens" not in d


def _points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        (dict(point.attributes or {}), point)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def test_usage_is_exported_as_genai_token_metrics(telemetry: Telemetry, stub: OpenAIStub) -> None:
    c = telemetry.client("tele-otel")
    c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    c.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    telemetry.flush()
    tokens = _points(telemetry.reader, "gen_ai.client.token.usage")
    by = {
        (a["gen_ai.operation.name"], a["gen_ai.request.model"], a["gen_ai.token.type"]): p
        for a, p in tokens
    }
    chat_usage, emb_usage = stub.reported[-2:]
    mini_in = by[("chat", "gpt-4o-mini", "input")]
    mini_out = by[("chat", "gpt-4o-mini", "output")]
    assert (mini_in.count, mini_in.sum) == (1, chat_usage["prompt_tokens"])
    assert (mini_out.count, mini_out.sum) == (1, chat_usage["completion_tokens"])
    emb = by[("embeddings", "text-embedding-3-small", "input")]
    assert emb.sum == emb_usage["prompt_tokens"]
    # every record the gateway sent, and only those: input tokens add up to what the upstream
    # reported across every call of this module (denied calls reached nobody, errors count 0)
    total_in = sum(p.sum for a, p in tokens if a["gen_ai.token.type"] == "input")
    assert total_in == sum(r["prompt_tokens"] for r in stub.reported)
    cost = _points(telemetry.reader, "quotaflow.client.cost")
    assert sum(p.value for _, p in cost) > 0


def test_every_metric_the_dashboard_and_alerts_use_is_exported(
    telemetry: Telemetry, worker: WorkerProcess
) -> None:
    c = telemetry.client("tele-scrape")
    for _ in range(3):
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    telemetry.flush()
    needed = used_metrics()

    def exported() -> set[str] | None:
        names = {s.split("{", 1)[0] for s in telemetry.scrape()}
        r = httpx.get(worker.base_url + "/metrics")
        assert r.status_code == 200
        worker_samples = samples(r.text)
        names |= {s.split("{", 1)[0] for s in worker_samples}
        # states published for this module's keys: the per-policy series are there
        return names if needed <= names else None

    names = wait_for(exported, timeout=30, what="every used metric in a scrape")
    assert needed <= names
