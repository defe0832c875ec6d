"""The worker's moving parts on a Faust app: the usage agent, the save, publication, refresh
and snapshot timers, and the stats page.

Per usage message the agent decodes every record (bad ones to the DLQ with a reason) and folds
them into the live entries of their keys (:mod:`quotaflow_stream.store`); it does not ack the
message yet. A save timer writes each changed entry to the table's changelog once, waits for
the broker to have them, and only then acks the messages folded before it, so Faust commits
offsets whose counts are durable. A fast timer publishes the new state of every key that
changed, once per tick however many messages touched it. Records whose key does not hash to the
message's partition are forwarded to the right one, so each key's counters live on exactly one
partition (and one worker) however a producer routed them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import faust

from quotaflow.partitioner import partition_of
from quotaflow.policies import PolicySet
from quotaflow.record import (
    REDACTED,
    Rejected,
    encode_records,
    looks_like_secret,
    parse_usage_value,
)
from quotaflow.settings import QuotaflowSettings
from quotaflow.state import HEARTBEAT_KEY, QuotaState, heartbeat_json
from quotaflow_stream.aggregate import fold_records
from quotaflow_stream.evaluate import ACTIVE_SOURCE_SECONDS, evaluate, scopes_for
from quotaflow_stream.output import BulkProducer
from quotaflow_stream.snapshot import SnapshotWriter
from quotaflow_stream.store import AggregateStore, aggregate_table

log = logging.getLogger(__name__)

DLQ_REASON_HEADER = "quotaflow-dlq-reason"
DLQ_ORIGIN_HEADER = "quotaflow-dlq-origin"

#: Seconds between checks whether a save is due (see UsagePipeline._save_tick).
SAVE_TICK = 0.1

#: Publication may take at most this share of the worker's time: under a backlog the states of
#: busy keys coalesce over longer ticks instead of starving the aggregation.
PUBLISH_SHARE = 0.2

#: Longest run of publications in one tick, as a share of the publication interval (Faust
#: warns of a timer that overruns its interval; the event loop stays responsive).
PUBLISH_SLICE = 0.8


class Counters:
    """What the worker has done, for ``/api/stats`` and the demo's summary."""

    def __init__(self) -> None:
        self.messages = 0
        self.records = 0
        self.dlq = 0
        self.late = 0
        self.duplicates = 0
        self.forwarded = 0
        self.states_published = 0
        self.heartbeats = 0
        self.started_at = time.time()
        #: Wall-clock time of the first and latest aggregated record (throughput = records
        #: over their difference, worker start-up excluded).
        self.first_record_at: float | None = None
        self.last_record_at: float | None = None
        #: CPU-side seconds spent decoding and folding messages, saving entries to the
        #: changelog and publishing states: where a busy worker's time goes.
        self.seconds_folding = 0.0
        self.seconds_saving = 0.0
        self.seconds_publishing = 0.0
        #: Seconds in the cycle collector, wherever it ran (see worker.time_collections).
        self.seconds_collecting = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class UsagePipeline:
    """Registers the agent, timers and pages of the quota pipeline on ``app``."""

    def __init__(
        self,
        app: faust.App,
        settings: QuotaflowSettings,
        policies: PolicySet,
        snapshot: SnapshotWriter,
        *,
        usage_partitions: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.settings = settings
        self.policies = policies
        self.snapshot = snapshot
        self.clock = clock
        self.partitions = usage_partitions
        self.counters = Counters()
        self._scopes_for = scopes_for(policies)
        # key -> its last usage (worker clock); its last publication is latest[key].published_at
        self._active: dict[str, float] = {}
        # source -> last usage from it (worker clock): the fleet size heartbeats announce
        self._sources: dict[str, float] = {}
        # keys whose usage changed since their state was last published
        self._dirty: dict[str, None] = {}  # insertion-ordered: the oldest change goes first
        t = settings.topics
        self.usage_topic = self._raw_topic(t.usage, usage_partitions)
        self.decisions_topic = self._raw_topic(t.decisions, usage_partitions)
        self.decisions_name = t.decisions
        self.dlq_topic = self._raw_topic(t.dlq, None)
        self.output = BulkProducer(settings)
        self.store = AggregateStore(
            aggregate_table(app, usage_partitions), usage_partitions, self.output
        )
        # usage messages folded but not acked yet (acked once their entries are saved)
        self._unacked: list[Any] = []
        self._unacked_records = 0
        # messages of the save under way: unacked until their entries are in the changelog
        self._acking = 0
        self._ack_stream: Any = None
        self._save_lock = asyncio.Lock()
        self._saved_at = time.monotonic()
        # usage partitions assigned here, and whether their keys await a first publication
        self._assigned: set[int] = set()
        self._announce = False
        self._swept_at = 0.0  # when _refresh last dropped old states from `latest`
        #: Set when the worker stops: every message is then saved and acked as it is folded,
        #: since Faust waits for all acks before it lets go of its partitions.
        self.closing = False
        # monotonic time before which the next publication tick is skipped (see PUBLISH_SHARE)
        self._publish_after = 0.0
        app.agent(self.usage_topic, name="aggregate-usage")(self._aggregate)
        app.timer(settings.worker.heartbeat_interval)(self._refresh)
        app.timer(settings.worker.publish_interval)(self._publish_dirty)
        app.timer(min(SAVE_TICK, settings.worker.save_interval))(self._save_tick)
        app.timer(settings.worker.snapshot_interval)(self._flush_snapshot)
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]
        #: The latest state published per key this worker owns (the API and dashboard read it).
        self.latest: dict[str, QuotaState] = {}
        #: Newest record's event time to its state's publication, for recent states (ms).
        self.latencies_ms: deque[float] = deque(maxlen=2000)
        #: Times a key went from open to throttled.
        self.throttle_onsets = 0

    # -- the agent ---------------------------------------------------------------------------

    async def _aggregate(self, stream: Any) -> None:
        # Acks are ours: a message is acked once the entries it changed are saved (see save).
        self._ack_stream = manual = stream.noack()
        save_at = self.settings.worker.save_every_records
        async for event in manual.events():
            try:
                await self.process_message(event.message, event.value)
            except Exception as exc:  # never let one message stop the worker
                log.exception("unexpected error on usage message; sent to the DLQ")
                reason = f"internal error: {type(exc).__name__}: {exc}"
                await self._dead_letter(event.message, Rejected(event.value or b"", reason))
            self._unacked.append(event)
            if self.closing or self._unacked_records >= save_at:
                await self.save()

    async def process_message(self, message: Any, value: bytes | None) -> None:
        c = self.counters
        c.messages += 1
        started = time.perf_counter()
        records, rejected = parse_usage_value(value)
        for bad in rejected:
            await self._dead_letter(message, bad)
        if not records:
            return
        now = self.clock()
        ahead = now + self.settings.worker.max_future_skew
        here, parts = message.partition, self.partitions
        for r in records:  # the common case is a clean message: check it without copying
            if r.ts > ahead or partition_of(r.key, parts) != here:
                records = await self._set_aside(message, records, ahead)
                break
        if not records:
            return
        if c.first_record_at is None:
            c.first_record_at = time.time()
        w = self.settings.worker
        store = self.store
        touched: set[str] = set()
        late, duplicates = fold_records(
            store.entries, records, self._scopes_for, w.grace_seconds, w.dedup_horizon, now,
            touched, load=store.load,
        )  # fmt: skip
        store.unsaved |= touched
        self._dirty.update(dict.fromkeys(touched))
        self._active.update(dict.fromkeys(touched, now))
        sources = self._sources
        for source in {r.source for r in records}:
            sources[source] = now
        c.duplicates += duplicates
        c.records += len(records) - duplicates
        c.late += late
        self._unacked_records += len(records)
        c.last_record_at = time.time()
        c.seconds_folding += time.perf_counter() - started

    async def _set_aside(self, message: Any, records: list[Any], ahead: float) -> list[Any]:
        """Dead-letter records from the future, forward those of other partitions; returns the
        records this partition counts."""
        here = message.partition
        skew = self.settings.worker.max_future_skew
        mine: list[Any] = []
        misrouted: dict[int, list[Any]] = defaultdict(list)
        for record in records:
            if record.ts > ahead:
                reason = f"ts: {record.ts} is more than {skew:g}s ahead of the worker clock"
                await self._dead_letter(message, Rejected(record.to_json(), reason))
                continue
            part = partition_of(record.key, self.partitions)
            if part == here:
                mine.append(record)
            else:
                misrouted[part].append(record)
        for part, recs in misrouted.items():
            await self.usage_topic.send(
                key=recs[0].key.encode(), value=encode_records(recs), partition=part
            )
            self.counters.forwarded += len(recs)
        return mine

    async def _save_tick(self) -> None:
        """Save every ``save_interval``, and at once while a rebalance waits for our acks."""
        due = time.monotonic() - self._saved_at >= self.settings.worker.save_interval
        if self._unacked and (due or self.app.rebalancing or self.closing):
            await self.save()

    async def save(self) -> None:
        """Write the changed entries to the changelog, then ack the messages folded into them
        (Faust commits acked offsets only). If the broker does not take them, nothing is acked
        and the next save tries again."""
        async with self._save_lock:
            self._saved_at = time.monotonic()
            events, self._unacked = self._unacked, []
            records, self._unacked_records = self._unacked_records, 0
            self._acking = len(events)
            started = time.perf_counter()
            try:
                try:
                    await self.store.save()
                except Exception as exc:
                    log.warning("saving aggregates failed (%s); retrying at the next save", exc)
                    self._unacked = events + self._unacked
                    self._unacked_records += records
                    return
                stream = self._ack_stream
                for event in events:
                    await stream.ack(event)
            finally:
                self._acking = 0
            # wall time: it includes waiting for the broker, when other work runs meanwhile
            self.counters.seconds_saving += time.perf_counter() - started

    async def _on_revoked(self, sender: Any, revoked: Any, **_: Any) -> None:
        """Save what is pending, then forget the entries of partitions that may move away
        (Faust recovers them from the changelog if they come back)."""
        await self.save()
        mine = {tp.partition for tp in revoked if tp.topic == self.usage_topic.get_topic_name()}
        dropped = self.store.forget(mine)
        for key in [k for k in self._dirty if k not in self.store.entries]:
            del self._dirty[key]
        log.info("partitions %s revoked: %d live entries released", sorted(mine), dropped)

    async def _on_assigned(self, sender: Any, assigned: Any, **_: Any) -> None:
        name = self.usage_topic.get_topic_name()
        self._assigned = {tp.partition for tp in assigned if tp.topic == name}
        self.store.release(self._assigned)
        self._announce = True

    def _announce_recovered(self) -> None:
        """Once recovered, publish every key of the assigned partitions: the decisions topic
        and the snapshot may hold an older state of keys taken over from a worker that died
        between saving an entry and publishing it, and no message of theirs may come again."""
        self._announce = False
        keys = self.store.keys_in(self._assigned)
        self._dirty.update(dict.fromkeys(keys))
        log.info("recovered %d keys; publishing their states", len(keys))

    async def _publish_dirty(self) -> None:
        """Publish the state of every key whose usage changed since the last tick.

        Under a backlog thousands of keys change between ticks. A tick stops within its interval
        (:data:`PUBLISH_SLICE`; the rest stay dirty, oldest first next time) and the next
        one waits so that publication takes at most :data:`PUBLISH_SHARE` of the time: the
        states of busy keys coalesce instead of starving the aggregation."""
        self.output.poll()
        if self._announce and self.ready:
            self._announce_recovered()
        started = time.monotonic()
        if not self._dirty or started < self._publish_after:
            return
        now = self.clock()
        store = self.store
        dirty = self._dirty
        stop_at = started + PUBLISH_SLICE * self.settings.worker.publish_interval
        done: list[str] = []
        for key in dirty:  # nothing folds meanwhile: this loop never awaits
            entry = store.get(key)
            if entry is not None:
                state = self._publish(key, entry, now)
                self.latencies_ms.append(max(now - state.watermark, 0.0) * 1000)
            done.append(key)
            if len(done) % 64 == 0 and time.monotonic() >= stop_at:
                break
        if len(done) == len(dirty):
            dirty.clear()
        else:
            for key in done:
                del dirty[key]
        spent = time.monotonic() - started
        self._publish_after = started + spent / PUBLISH_SHARE
        self.counters.seconds_publishing += spent

    def _publish(self, key: str, entry: dict[str, Any], now: float) -> QuotaState:
        state = evaluate(key, entry, self.policies, now)
        before = self.latest.get(key)
        if state.throttled and (before is None or not before.throttled):
            self.throttle_onsets += 1
        self.latest[key] = state
        payload = state.to_json()
        self.output.send(self.decisions_name, key.encode(), payload)
        self.snapshot.put(key, payload)
        self.counters.states_published += 1
        return state

    def current_state(self, key: str) -> QuotaState | None:
        """The key's state now, if this worker owns it (evaluated afresh: windows slide)."""
        entry = self.store.get(key)
        if entry is None:
            return None
        return evaluate(key, entry, self.policies, self.clock())

    def stats(self) -> dict[str, Any]:
        stats = self.counters.as_dict()
        stats.update(
            ready=self.ready,
            snapshot_written=self.snapshot.written,
            snapshot_pending=self.snapshot.pending,
            snapshot_healthy=self.snapshot.healthy,
            active_keys=len(self._active),
            published_keys=len(self.latest),
            unacked_messages=len(self._unacked) + self._acking,
            output_failed=self.output.failed,
            **self.store.stats(),
        )
        return stats

    async def _dead_letter(self, message: Any, rejected: Rejected) -> None:
        origin = f"{message.topic}/{message.partition}/{message.offset}"
        log.warning("usage rejected to DLQ (%s): %s", origin, rejected.reason)
        # A producer that keyed its message by a raw credential must not see it copied on.
        key = REDACTED.encode() if looks_like_secret(message.key) else message.key
        await self.dlq_topic.send(
            key=key,
            value=rejected.raw,
            headers={
                DLQ_REASON_HEADER: rejected.reason.encode(),
                DLQ_ORIGIN_HEADER: origin.encode(),
            },
        )
        self.counters.dlq += 1

    def _raw_topic(self, name: str, partitions: int | None) -> Any:
        # Bytes in, bytes out: parsing is ours, so a bad message reaches the DLQ instead of
        # failing inside Faust's deserializer.
        return self.app.topic(
            name,
            partitions=partitions,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )

    @property
    def ready(self) -> bool:
        """Partitions assigned and tables recovered: usage sent now is processed promptly."""
        app = self.app
        try:
            assigned = bool(app.consumer.assignment())
            recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        except Exception:  # not started yet
            return False
        return assigned and recovered and not app.rebalancing

    # -- timers ------------------------------------------------------------------------------

    async def _refresh(self) -> None:
        """Re-publish active keys now and then (windows roll over without new usage), and send
        a heartbeat so followers can tell a quiet worker from a dead one."""
        now = self.clock()
        w = self.settings.worker
        horizon = now - w.active_horizon
        entries = self.store.entries
        latest, dirty = self.latest, self._dirty
        due = now - w.refresh_interval
        for key, used in list(self._active.items()):
            if used < horizon or key not in entries:
                # quiet (or moved away): the snapshot keeps its last state for the dashboard;
                # dropping it here keeps memory to the keys in use
                del self._active[key]
                latest.pop(key, None)
                continue
            state = latest.get(key)
            if state is None or state.published_at <= due:
                dirty[key] = None  # published by a coming tick, within its time budget
        if now - self._swept_at >= w.active_horizon / 4:
            # states published without later usage (keys recovered, then quiet) go too
            self._swept_at = now
            active = self._active
            for key in [k for k, st in latest.items() if st.published_at < horizon]:
                if key not in active:
                    del latest[key]
        quiet = now - ACTIVE_SOURCE_SECONDS
        for source in [s for s, seen in self._sources.items() if seen < quiet]:
            del self._sources[source]
        beat = heartbeat_json(now, self.settings.worker.app_id, len(self._sources))
        for partition in range(self.partitions):
            await self.decisions_topic.send(
                key=HEARTBEAT_KEY.encode(), value=beat, partition=partition
            )
        self.counters.heartbeats += 1

    async def _flush_snapshot(self) -> None:
        await self.snapshot.flush()
