"""Usage emitter: ``emit()`` returns at once; a background thread packs and sends.

Records are grouped by destination partition (Kafka's murmur2 of the counter key) and sent as
one message per partition per flush, at most ``max_batch`` records each. A record that finds
the emitter idle is sent at once; records that come within ``flush_interval`` seconds of a
flush wait for the next one and go together, sooner when a batch fills. So a quiet instance's
usage reaches the stream without waiting out an interval, and a busy one's is still batched.
The send goes through a :class:`~quotaflow.transports.Transport`, so tests can swap Kafka for
memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

from quotaflow._exceptions import TransportFull
from quotaflow.journal import Journal
from quotaflow.messages import Encodable, encode_records
from quotaflow.partitioner import partition_of
from quotaflow.transports import Transport

log = logging.getLogger(__name__)


class UsageEmitter:
    """Non-blocking, batching, ordered sender of usage records."""

    def __init__(
        self,
        transport: Transport,
        topic: str,
        *,
        max_batch: int = 500,
        flush_interval: float = 0.02,
        max_buffered: int = 1_000_000,
        on_overflow: Callable[[Encodable], None] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.transport = transport
        self.topic = topic
        self.max_batch = max_batch
        self.flush_interval = flush_interval
        self.max_buffered = max_buffered
        self._on_overflow = on_overflow
        self.journal = journal
        #: Called in the emitter thread with each chunk of records as it is handed to the
        #: transport (OpenTelemetry export): off the request path, and once per record.
        self.observers: list[Callable[[list[Encodable]], None]] = []
        # Past the memory bound records wait here for the emitter thread to journal them
        # (emit() never touches the disk); while the journal holds records, every new record
        # follows them there, so order is kept.
        self._spill: deque[Encodable] = deque()
        self._spilling = bool(journal)
        self._mode = threading.Lock()
        self._buffer: deque[Encodable] = deque()
        # Rung by emit() only on the first record after a flush and when a batch fills: a
        # C-level put (a fraction of a microsecond), where an Event's set() is Python code
        # taking a lock, which emit() paid on every record while the buffer stayed full.
        self._bell: SimpleQueue[None] = SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent_records = 0
        self.sent_messages = 0
        self.overflowed = 0
        # Flush early once every partition's message could be full (before the topic's
        # partitions are known: one message's worth).
        self._full = max_batch

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="quotaflow-emitter", daemon=True)
        self._thread.start()

    def emit(self, record: Encodable) -> None:
        """Queue a record; never blocks."""
        if self.journal is not None and (self._spilling or len(self._buffer) >= self.max_buffered):
            with self._mode:
                if self._spilling or len(self._buffer) >= self.max_buffered:
                    self._spilling = True
                    self._spill.append(record)
                    return
        elif len(self._buffer) >= self.max_buffered:
            self.overflowed += 1
            if self._on_overflow is not None:
                self._on_overflow(record)
            elif self.overflowed == 1 or self.overflowed % 10_000 == 0:
                log.error(
                    "usage buffer full (%d records): %d records dropped so far",
                    self.max_buffered,
                    self.overflowed,
                )
            return
        buffer = self._buffer
        buffer.append(record)
        held = len(buffer)
        if held == 1 or held == self._full:
            self._bell.put(None)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._buffer:
                # idle: the next record rings (the journal, if any, is tended each interval)
                self._await_bell(self.flush_interval)
            while not self._bell.empty():  # rings already answered by this flush
                self._bell.get_nowait()
            if self.journal is not None:
                self._journal_tick()
            self._drain()
            # what comes within the interval after a flush waits for the next: one message
            # per partition per interval under load, unless a batch fills first
            deadline = time.monotonic() + self.flush_interval
            while len(self._buffer) < self._full and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or not self._await_bell(left):
                    break
        self._drain()

    def _await_bell(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a ring; True if one came."""
        try:
            self._bell.get(timeout=timeout)
        except Empty:
            return False
        return True

    def _journal_tick(self) -> None:
        """Journal what spilled; once memory is drained into the producer, replay the oldest
        journaled records; leave spill mode when nothing is left on disk."""
        journal = self.journal
        assert journal is not None
        if self._spill:
            spilled = [self._spill.popleft() for _ in range(len(self._spill))]
            journal.append(spilled)
        if journal and not self._buffer:
            records, offset = journal.read(self.max_batch * 8)
            self._buffer.extend(records)
            journal.commit(offset, len(records))
        if not journal:
            with self._mode:
                if not self._spill:
                    self._spilling = False

    def _drain(self) -> None:
        if not self._buffer:
            return
        batch: list[Encodable] = []
        while self._buffer:
            batch.append(self._buffer.popleft())
        partitions = self.transport.partitions(self.topic)
        groups: dict[Any, list[Encodable]] = {}
        if partitions:
            self._full = self.max_batch * partitions
            for record in batch:
                groups.setdefault(partition_of(record.key, partitions), []).append(record)
        else:
            for record in batch:
                groups.setdefault(record.key, []).append(record)
        unsent: list[Encodable] = []
        for group, records in groups.items():
            partition = group if isinstance(group, int) else None
            for i in range(0, len(records), self.max_batch):
                chunk = records[i : i + self.max_batch]
                if unsent:
                    unsent.extend(chunk)
                    continue
                try:
                    self.transport.send(
                        self.topic, partition, chunk[0].key.encode(), encode_records(chunk)
                    )
                except TransportFull:
                    unsent.extend(chunk)
                    continue
                self.sent_records += len(chunk)
                self.sent_messages += 1
                for observe in self.observers:
                    try:
                        observe(chunk)
                    except Exception:  # an observer must never stop delivery
                        log.exception("usage observer %r failed", observe)
        if unsent:
            # Back to the front, in order; give the transport a moment to drain.
            self._buffer.extendleft(reversed(unsent))
            time.sleep(0.005)

    def close(self, timeout: float = 10.0) -> int:
        """Send everything buffered and wait for delivery.

        Returns what is still undelivered at the deadline: messages in the transport plus
        records never handed to it (0 is success).
        """
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._bell.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        # A full transport puts records back; keep handing them over (journaled ones too, in
        # order) until the deadline.
        while (self._buffer or self._spill or self.journal) and time.monotonic() < deadline:
            if self.journal is not None:
                self._journal_tick()
            self._drain()
        if self.journal is not None and (self._buffer or self._spill):
            # the broker is away: keep them on disk for the next process rather than lose them;
            # memory holds what is older than the journal, the spill what is newer
            self.journal.prepend(list(self._buffer))
            self.journal.append(list(self._spill))
            self._buffer.clear()
            self._spill.clear()
        left = self.transport.flush(max(deadline - time.monotonic(), 0.0)) + len(self._buffer)
        self.transport.close()
        # records kept on disk are not lost, but not delivered either
        return left + (self.journal.pending if self.journal is not None else 0)
