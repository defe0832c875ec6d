"""Where the emitter's messages go: one abstract method, ``send``.

:class:`KafkaTransport` is the real one (confluent-kafka, built by :mod:`quotaflow._kafka`).
:class:`MemoryTransport` keeps what was sent in a list, for services' own tests of code that
records usage, as httpx's ``MockTransport`` serves tests of code that makes requests::

    transport = MemoryTransport()
    with QuotaClient(settings, transport=transport, follow=False) as quota:
        quota.record("team-alpha", "gpt-4o", prompt_tokens=10)
    assert [r.key for r in transport.records()] == ["team-alpha"]
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any

from quotaflow._exceptions import TransportFull
from quotaflow._kafka import kafka_errors, producer
from quotaflow.messages import parse_usage_value
from quotaflow.record import WireRecord

log = logging.getLogger(__name__)


class Transport:
    """Sends usage messages for the emitter's thread. Subclasses implement :meth:`send`."""

    def send(self, topic: str, partition: int | None, key: bytes, value: bytes) -> None:
        """Queue one message; raise :class:`TransportFull` when the local queue is full."""
        raise NotImplementedError

    def partitions(self, topic: str) -> int | None:
        """Partition count of ``topic``, or None while unknown (records then group by key)."""
        return None

    def flush(self, timeout: float) -> int:
        """Deliver what is queued; return how many messages are still undelivered."""
        return 0

    def close(self) -> None:
        """Release the transport's resources."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class KafkaTransport(Transport):
    """confluent-kafka producer with Kafka's default (murmur2) partitioner and idempotence."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._producer = producer(
            config,
            # the emitter batches already (a message per partition per flush): a linger would
            # only delay a quiet instance's usage (record -> broker p50 10 -> 6 ms measured)
            linger_ms=0,
            # JSON usage compresses ~5x: less for the broker to keep (the usage topic is the
            # audit trail) and for workers to read. Workers decode it with cramjam.
            compression_type="lz4",
            queue_buffering_max_messages=100_000,
            # never expire a queued message while the broker is away: the journal bounds memory
            message_timeout_ms=0,
        )
        self._bootstrap = str(config.get("bootstrap.servers", "?"))
        self._partitions: dict[str, int] = {}
        self.delivered = 0
        self.failed = 0

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1
            log.error("usage message not delivered: %s", err)

    def send(self, topic: str, partition: int | None, key: bytes, value: bytes) -> None:
        try:
            with kafka_errors(f"sending usage to {topic}", self._bootstrap):
                if partition is None:
                    self._producer.produce(
                        topic, value=value, key=key, on_delivery=self._on_delivery
                    )
                else:
                    self._producer.produce(
                        topic,
                        value=value,
                        key=key,
                        partition=partition,
                        on_delivery=self._on_delivery,
                    )
        except TransportFull:
            # The queue counts messages until their delivery reports are served: serve them,
            # or a queue that filled during an outage stays "full" after the broker is back.
            self._producer.poll(0)
            raise
        self._producer.poll(0)

    def partitions(self, topic: str) -> int | None:
        count = self._partitions.get(topic)
        if count is None:
            try:
                md = self._producer.list_topics(topic, timeout=2.0)
            except Exception as exc:  # broker away: stay unknown, group by key meanwhile
                log.debug("metadata for %s unavailable: %s", topic, exc)
                return None
            meta = md.topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                return None
            count = self._partitions[topic] = len(meta.partitions)
        return count

    def flush(self, timeout: float) -> int:
        return int(self._producer.flush(timeout))

    def close(self) -> None:
        self._producer.flush(0)


class MemoryTransport(Transport):
    """Keeps every message sent in :attr:`sent`; can refuse sends like a full producer."""

    def __init__(self, partitions: int | None = 4, refuse: int = 0) -> None:
        #: ``(topic, partition, key, value)`` of every message taken, in order.
        self.sent: list[tuple[str, int | None, bytes, bytes]] = []
        self._partitions = partitions
        #: Refuse this many sends with :class:`TransportFull` first.
        self.refuse = refuse
        #: Refuse every send, as a producer whose broker is away fills up.
        self.down = False
        self.flushed = False
        self.closed = False
        self.lock = threading.Lock()

    def send(self, topic: str, partition: int | None, key: bytes, value: bytes) -> None:
        with self.lock:
            if self.down:
                raise TransportFull("broker away")
            if self.refuse:
                self.refuse -= 1
                raise TransportFull("queue full")
            self.sent.append((topic, partition, key, value))

    def partitions(self, topic: str) -> int | None:
        return self._partitions

    def flush(self, timeout: float) -> int:
        self.flushed = True
        return 0

    def close(self) -> None:
        self.closed = True

    def records(self) -> list[WireRecord]:
        """Every usage record sent, decoded as the worker decodes them."""
        with self.lock:
            values = [value for _, _, _, value in self.sent]
        return [record for value in values for record in parse_usage_value(value)[0]]
