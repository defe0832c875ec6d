"""In-memory stand-ins for unit tests of logic (never the only test of a path)."""

from __future__ import annotations

import threading

from quotaflow._exceptions import TransportFull
from quotaflow.record import UsageRecord, parse_usage_value


class MemoryTransport:
    """In-memory stand-in for the Kafka transport: records what was sent."""

    def __init__(self, partitions: int | None = 4, refuse: int = 0) -> None:
        self.sent: list[tuple[str, int | None, bytes, bytes]] = []
        self._partitions = partitions
        self.refuse = refuse  # refuse this many sends with TransportFull first
        self.down = False  # refuse every send, as a producer whose broker is away fills up
        self.flushed = False
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
        pass

    def records(self) -> list[UsageRecord]:
        out: list[UsageRecord] = []
        for _, _, _, value in self.sent:
            out.extend(parse_usage_value(value)[0])
        return out
