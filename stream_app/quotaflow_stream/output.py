"""The worker's bulk producer: quota states and its table's changelog.

Faust's producer path (FutureMessage, PendingMessage, aiokafka's accumulator, all Python) is
most of the ~0.2 ms a Faust table write costs; a busy worker writes thousands of states and
changelog entries a second, so those go through confluent-kafka (librdkafka, C), a few us a
message. Faust still consumes, manages the group, recovers the table and sends the rare
messages (dead letters, forwarded records, heartbeats).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from quotaflow._exceptions import DeliveryFailed
from quotaflow._kafka import producer
from quotaflow.settings import QuotaflowSettings

log = logging.getLogger(__name__)

#: Seconds between polls for delivery reports while waiting on a batch.
_POLL_PAUSE = 0.002


class BulkProducer:
    """A confluent-kafka producer the event loop can await batches on."""

    def __init__(self, settings: QuotaflowSettings, *, delivery_timeout: float = 30.0) -> None:
        self._producer = producer(
            settings.kafka.confluent_config(),
            # states are latency-bound: a short linger still batches a busy tick's states
            linger_ms=2,
            # every follower fetches every state: a busy key's state lists its next 8 s of
            # bucket expiries (dozens of near-identical rows), which lz4 shrinks several times
            # over for the broker and each follower (librdkafka decompresses off the GIL)
            compression_type="lz4",
            queue_buffering_max_messages=500_000,
            message_timeout_ms=int(delivery_timeout * 1000),
        )
        self.sent = 0
        self.failed = 0

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            log.error("worker output to %s not delivered: %s", msg.topic(), err)

    def send(self, topic: str, key: bytes, value: bytes, partition: int | None = None) -> None:
        """Queue one message (delivery reported in the log if it fails)."""
        self._produce(topic, key, value, partition, self._on_delivery)

    async def send_all(self, topic: str, messages: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Send ``(key, value, partition)`` messages and wait until the broker has them all;
        raises :class:`DeliveryFailed` if any is refused."""
        outstanding = [0, 0]  # queued, failed

        def done(err: Any, msg: Any) -> None:
            outstanding[0] -= 1
            if err is not None:
                outstanding[1] += 1
                log.error("changelog write to %s not delivered: %s", msg.topic(), err)

        for key, value, partition in messages:
            outstanding[0] += 1
            self._produce(topic, key, value, partition, done)
        while outstanding[0] > 0:
            self._producer.poll(0)
            if outstanding[0] > 0:
                await asyncio.sleep(_POLL_PAUSE)
        if outstanding[1]:
            raise DeliveryFailed(f"{outstanding[1]} messages to {topic} not delivered")

    def _produce(
        self, topic: str, key: bytes, value: bytes, partition: int | None, callback: Any
    ) -> None:
        while True:
            try:
                if partition is None:
                    self._producer.produce(topic, value=value, key=key, on_delivery=callback)
                else:
                    self._producer.produce(
                        topic, value=value, key=key, partition=partition, on_delivery=callback
                    )
                self.sent += 1
                return
            except BufferError:
                # queue full: serve delivery reports (they free its slots) and try again
                self._producer.poll(0.01)

    def poll(self) -> None:
        """Serve delivery reports (the event loop calls this on every publication tick)."""
        self._producer.poll(0)

    def flush(self, timeout: float) -> int:
        return int(self._producer.flush(timeout))
