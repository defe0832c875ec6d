"""The usage pipeline: decode, fold, save, ack, and what rebalances ask of them.

Per usage message the pipeline decodes every record (bad ones to the dead letters with a
reason) and folds them into the live entries of their keys (:meth:`AggregateStore.fold`); it
does not ack the message yet. A save writes each changed entry to the table's changelog once,
waits for the broker to have them, and only then acks the messages folded before it, so Faust
commits offsets whose counts are durable. Records whose key does not hash to the message's
partition are forwarded to the right one, so each key's counters live on exactly one partition
(and one worker) however a producer routed them.

Nothing here knows Faust: :mod:`quotaflow_stream.agents` registers the pipeline on an app, and
unit tests drive it with in-memory stand-ins for the stream, the store's table and producer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

from quotaflow.messages import Rejected, encode_records, parse_usage_value
from quotaflow.partitioner import partition_of
from quotaflow.record import WireRecord
from quotaflow.settings import WorkerSettings
from quotaflow_stream.counters import Counters
from quotaflow_stream.deadletters import DeadLetters
from quotaflow_stream.publisher import StatePublisher
from quotaflow_stream.store import AggregateStore

log = logging.getLogger(__name__)

#: Seconds between checks whether a save is due (see :meth:`UsagePipeline.save_tick`).
SAVE_TICK = 0.1


class ForwardTopic(Protocol):
    """Where misrouted records go: the usage topic itself, to their key's partition."""

    async def send(self, *, key: bytes, value: bytes, partition: int) -> Any: ...


class AckStream(Protocol):
    """A stream whose events the pipeline acks itself (Faust's ``stream.noack()``)."""

    def events(self) -> Any: ...

    async def ack(self, event: Any) -> Any: ...


class UsagePipeline:
    """Folds usage messages into the store, saves, and acks only what is saved."""

    def __init__(
        self,
        settings: WorkerSettings,
        store: AggregateStore,
        publisher: StatePublisher,
        dead_letters: DeadLetters,
        forward: ForwardTopic,
        *,
        partitions: int,
        counters: Counters,
        rebalancing: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.dead_letters = dead_letters
        self.forward = forward
        self.partitions = partitions
        self.counters = counters
        self._rebalancing = rebalancing
        self.clock = clock
        self._monotonic = monotonic
        # usage messages folded but not acked yet (acked once their entries are saved)
        self._unacked: list[Any] = []
        self._unacked_records = 0
        # messages of the save under way: unacked until their entries are in the changelog
        self._acking = 0
        self._ack_stream: AckStream | None = None
        self._save_lock = asyncio.Lock()
        self._saved_at = monotonic()
        #: Set when the worker stops: every message is then saved and acked as it is folded,
        #: since Faust waits for all acks before it lets go of its partitions.
        self.closing = False

    @property
    def unacked_messages(self) -> int:
        """Messages folded whose save has not been delivered yet."""
        return len(self._unacked) + self._acking

    async def consume(self, stream: AckStream) -> None:
        """The agent: every event of ``stream`` (already ``noack()``), folded and saved."""
        self._ack_stream = stream
        save_at = self.settings.save_every_records
        async for event in stream.events():
            try:
                await self.process_message(event.message, event.value)
            except Exception as exc:  # never let one message stop the worker
                log.exception("unexpected error on usage message; sent to the DLQ")
                reason = f"internal error: {type(exc).__name__}: {exc}"
                await self.dead_letters.send(event.message, Rejected(event.value or b"", reason))
            try:
                await self.publisher.publish_if_idle()
            except Exception:  # the keys stay due for the tick: never stop consuming over it
                log.exception("publishing states after a usage message failed")
            self._unacked.append(event)
            if self.closing or self._unacked_records >= save_at:
                await self.save()

    async def process_message(self, message: Any, value: bytes | None) -> None:
        """Decode one usage message and fold the records this partition counts."""
        c = self.counters
        c.messages += 1
        started = time.perf_counter()
        records, rejected = parse_usage_value(value)
        for bad in rejected:
            await self.dead_letters.send(message, bad)
        if not records:
            return
        now = self.clock()
        ahead = now + self.settings.max_future_skew
        here, parts = message.partition, self.partitions
        for r in records:  # the common case is a clean message: check it without copying
            if r.ts > ahead or partition_of(r.key, parts) != here:
                records = await self._set_aside(message, records, ahead)
                break
        if not records:
            return
        if c.first_record_at is None:
            c.first_record_at = time.time()
        folded = self.store.fold(records, now)
        self.publisher.changed(folded.touched, {r.source for r in records}, now)
        c.duplicates += folded.duplicates
        c.records += len(records) - folded.duplicates
        c.late += folded.late
        self._unacked_records += len(records)
        c.last_record_at = time.time()
        c.seconds_folding += time.perf_counter() - started
        c.at_last_record = (c.seconds_saving, c.seconds_publishing, c.seconds_collecting)

    async def _set_aside(
        self, message: Any, records: list[WireRecord], ahead: float
    ) -> list[WireRecord]:
        """Dead-letter records from the future, forward those of other partitions; returns the
        records this partition counts."""
        here = message.partition
        skew = self.settings.max_future_skew
        mine: list[WireRecord] = []
        misrouted: dict[int, list[WireRecord]] = defaultdict(list)
        for record in records:
            if record.ts > ahead:
                reason = f"ts: {record.ts} is more than {skew:g}s ahead of the worker clock"
                await self.dead_letters.send(message, Rejected(record.to_json(), reason))
                continue
            part = partition_of(record.key, self.partitions)
            if part == here:
                mine.append(record)
            else:
                misrouted[part].append(record)
        for part, recs in misrouted.items():
            await self.forward.send(
                key=recs[0].key.encode(), value=encode_records(recs), partition=part
            )
            self.counters.forwarded += len(recs)
        return mine

    async def save_tick(self) -> None:
        """Save every ``save_interval``, and at once while a rebalance waits for our acks."""
        due = self._monotonic() - self._saved_at >= self.settings.save_interval
        if self._unacked and (due or self._rebalancing() or self.closing):
            await self.save()

    async def save(self) -> bool:
        """Write the changed entries to the changelog, then ack the messages folded into them
        (Faust commits acked offsets only). If the broker does not take them, nothing is acked
        and the next save tries again; returns whether everything folded is now saved."""
        async with self._save_lock:
            self._saved_at = self._monotonic()
            events, self._unacked = self._unacked, []
            records, self._unacked_records = self._unacked_records, 0
            self._acking = len(events)
            started = time.perf_counter()
            try:
                try:
                    await self.store.save()
                except BaseException as exc:  # cancelled (a bounded stop) too: nothing acked
                    self._unacked = events + self._unacked
                    self._unacked_records += records
                    if not isinstance(exc, Exception):
                        raise
                    log.warning("saving aggregates failed (%s); retrying at the next save", exc)
                    return False
                stream = self._ack_stream
                if stream is not None:
                    for event in events:
                        await stream.ack(event)
            finally:
                self._acking = 0
            # wall time: it includes waiting for the broker, when other work runs meanwhile
            self.counters.seconds_saving += time.perf_counter() - started
            return True

    async def revoked(self, partitions: set[int]) -> None:
        """Save what is pending, then forget the entries of usage ``partitions`` that may move
        away (Faust recovers them from the changelog if they come back)."""
        await self.save()
        dropped = self.store.forget(partitions)
        self.publisher.released()
        log.info("partitions %s revoked: %d live entries released", sorted(partitions), dropped)

    def assigned(self, partitions: set[int]) -> None:
        """Usage ``partitions`` are this worker's now."""
        self.store.release(partitions)
        self.publisher.assigned(partitions)
