"""Gateways for tests: started in a thread of the test process in front of a local upstream,
with usage going to the module's real pipeline, and the usage topic read back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from quotaflow import QuotaClient
from quotaflow.messages import parse_usage_value
from quotaflow.record import UsageRecord
from quotaflow.settings import GatewaySettings, QuotaflowSettings
from quotaflow_producers.gateway.runner import GatewayThread
from quotaflow_stream.harness import free_port

GatewayFactory = Callable[..., GatewayThread]


def gateway_factory(base_settings: QuotaflowSettings, upstream: str) -> Iterator[GatewayFactory]:
    """Yields ``make(**gateway_settings)``; every gateway made is stopped afterwards. Every
    route goes to ``upstream`` unless ``upstreams`` says otherwise."""
    running: list[tuple[GatewayThread, QuotaClient]] = []

    def make(**gateway: Any) -> GatewayThread:
        settings = base_settings.model_copy(deep=True)
        overrides = {
            "upstream": upstream,
            "upstreams": {},
            "listen_port": free_port(),
            # most tests name their key by header, as a gateway behind an authenticating proxy
            # would let them (test_a_caller_cannot_choose_its_key... covers the defaults)
            "key_sources": ["header", "api_key"],
        }
        settings.gateway = GatewaySettings.model_validate(
            {**settings.gateway.model_dump(), **overrides, **gateway}
        )
        settings.client.source = f"gateway-{len(running)}"
        quota = QuotaClient(settings).open()
        quota.cache.mark_heard()
        gw = GatewayThread(settings, quota).start()
        running.append((gw, quota))
        return gw

    yield make
    for gw, quota in running:
        gw.stop()
        quota.close()


def flush(gw: GatewayThread) -> None:
    """Hand every record the gateway holds to the broker, and wait for delivery."""
    emitter = gw.gateway.quota.emitter
    assert emitter is not None
    emitter._drain()
    emitter.transport.flush(10)


def usage_records(settings: QuotaflowSettings) -> list[tuple[bytes, UsageRecord]]:
    """Every record on the usage topic (with the message it came in)."""
    consumer = Consumer({**settings.kafka.confluent_config(), "group.id": "gw-audit"})
    topic = settings.topics.usage
    parts = range(settings.topics.partitions)
    ends = {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts
    }
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    out: list[tuple[bytes, UsageRecord]] = []
    done = {p for p in parts if ends[p] == 0}
    while len(done) < len(ends):
        for msg in consumer.consume(500, timeout=1.0):
            if msg.error() is None:
                out.extend((msg.value(), r) for r in parse_usage_value(msg.value())[0])
                if msg.offset() + 1 >= ends[msg.partition()]:
                    done.add(msg.partition())
    consumer.close()
    return out
