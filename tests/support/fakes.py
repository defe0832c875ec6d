"""In-memory stand-ins for unit tests of logic (never the only test of a path).

The SDK's own stand-in, :class:`quotaflow.transports.MemoryTransport`, ships in the package;
these stand in for the worker's surroundings: Faust's table, topics, messages and stream, the
bulk producer and the Redis snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

CHANGELOG = "app-usage-aggregates-changelog"


class FakeChangelogTopic:
    def get_topic_name(self) -> str:
        return CHANGELOG


class FakeTable:
    """Faust's table as the store uses it: ``data`` (what Faust recovers into) and its
    changelog topic's name."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.changelog_topic = FakeChangelogTopic()


class FakeOutput:
    """The worker's bulk producer: records what it was sent. ``fail`` refuses batches;
    ``hold`` keeps a batch waiting until it is released (a broker slow to confirm)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, int | None]] = []
        self.fail = False
        self.hold: asyncio.Event | None = None
        self.failed = 0

    async def send_all(self, topic: str, messages: Iterable[tuple[bytes, bytes, int]]) -> None:
        messages = list(messages)
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            raise RuntimeError("broker away")
        self.sent.extend((topic, k, v, p) for k, v, p in messages)

    def send(self, topic: str, key: bytes, value: bytes, partition: int | None = None) -> None:
        self.sent.append((topic, key, value, partition))

    def poll(self) -> None:
        pass

    def to(self, topic: str) -> list[tuple[bytes, bytes, int | None]]:
        return [(k, v, p) for t, k, v, p in self.sent if t == topic]


class FakeSnapshot:
    def __init__(self) -> None:
        self.states: dict[str, bytes] = {}

    def put(self, key: str, payload: bytes) -> None:
        self.states[key] = payload


class FakeTopic:
    """A Faust topic that records ``send(key=, value=, partition=, headers=)``."""

    def __init__(self, name: str = "topic") -> None:
        self.name = name
        self.sent: list[dict[str, Any]] = []

    async def send(self, **message: Any) -> None:
        self.sent.append(message)

    def get_topic_name(self) -> str:
        return self.name


@dataclass
class FakeMessage:
    """What the pipeline reads of a Faust message."""

    partition: int
    offset: int
    key: bytes | None = None
    topic: str = "usage"


@dataclass
class FakeEvent:
    message: FakeMessage
    value: bytes | None


@dataclass
class FakeStream:
    """A ``noack()`` stream: yields its events, then waits (as a live stream does) until
    ``close()``; records what was acked, in order."""

    events_in: list[FakeEvent] = field(default_factory=list)
    acked: list[FakeEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue[FakeEvent | None] = asyncio.Queue()
        for event in self.events_in:
            self._queue.put_nowait(event)

    def put(self, event: FakeEvent) -> None:
        self._queue.put_nowait(event)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[FakeEvent]:
        while (event := await self._queue.get()) is not None:
            yield event

    async def ack(self, event: FakeEvent) -> bool:
        self.acked.append(event)
        return True

    async def drained(self) -> None:
        """Until every event put so far has been taken by the consumer."""
        while not self._queue.empty():
            await asyncio.sleep(0)
        await asyncio.sleep(0)
