"""The pipeline's Kafka topics: their specs, and creating them idempotently with the admin API."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from quotaflow._exceptions import ConfigError
from quotaflow._kafka import admin as kafka_admin
from quotaflow._kafka import kafka_errors
from quotaflow.settings import QuotaflowSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: QuotaflowSettings) -> list[TopicSpec]:
    """Usage (long retention: the audit trail), decisions (compacted), the dead letters, the
    live policies (compacted, one partition) and the alerts."""
    t = settings.topics
    return [
        TopicSpec(
            t.usage,
            t.partitions,
            t.replication_factor,
            {"retention.ms": str(t.usage_retention_ms), "cleanup.policy": "delete"},
        ),
        TopicSpec(t.decisions, t.partitions, t.replication_factor, {"cleanup.policy": "compact"}),
        TopicSpec(
            t.dlq,
            t.partitions,
            t.replication_factor,
            {"retention.ms": str(t.usage_retention_ms), "cleanup.policy": "delete"},
        ),
        # one partition: every reader sees versions in the order they were written
        TopicSpec(t.policies, 1, t.replication_factor, {"cleanup.policy": "compact"}),
        TopicSpec(
            t.alerts,
            t.partitions,
            t.replication_factor,
            {"retention.ms": str(t.usage_retention_ms), "cleanup.policy": "delete"},
        ),
    ]


def ensure_topics(settings: QuotaflowSettings, timeout: float = 30.0) -> dict[str, int]:
    """Create missing topics; return each topic's actual partition count.

    Usage and decisions must have the same partition count: a key's decisions partition is where
    followers expect it, and the worker's table is co-partitioned with usage.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    bootstrap = settings.kafka.bootstrap_servers
    # connection attempts give up within the timeout, so an absent broker is said once, clearly
    admin = kafka_admin(
        settings.kafka.confluent_config(),
        socket_connection_setup_timeout_ms=int(min(timeout, 10.0) * 1000),
    )
    specs = topic_specs(settings)
    with kafka_errors("listing topics", bootstrap):
        existing = admin.list_topics(timeout=timeout).topics
    missing = [s for s in specs if s.name not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(s.name, s.partitions, s.replication_factor, config=s.config)
                for s in missing
            ],
            operation_timeout=timeout,
        )
        for name, fut in futures.items():
            try:
                fut.result()
                log.info("created topic %s", name)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise ConfigError(f"cannot create topic {name}: {exc}") from None
    counts: dict[str, int] = {}
    md = admin.list_topics(timeout=timeout)
    for s in specs:
        meta = md.topics.get(s.name)
        counts[s.name] = len(meta.partitions) if meta is not None else 0
    usage, decisions = settings.topics.usage, settings.topics.decisions
    if counts[usage] != counts[decisions]:
        raise ConfigError(
            f"topics {usage} ({counts[usage]} partitions) and {decisions} "
            f"({counts[decisions]}) must have the same partition count"
        )
    return counts
