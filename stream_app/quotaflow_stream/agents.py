"""The worker's moving parts on a Faust app: the usage agent, the refresh timer, the snapshot
timer and the stats page.

Per usage message the agent parses every record (bad ones to the DLQ with a reason) and folds
each key's records into its table entry with one write; a fast timer publishes the new state of
every key that changed, once per tick however many messages touched it. Records
whose key does not hash to the message's partition are forwarded to the right one, so each key's
counters live on exactly one partition (and one worker) however a producer routed them.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import faust

from quotaflow.partitioner import partition_for
from quotaflow.policies import PolicySet
from quotaflow.record import (
    REDACTED,
    Rejected,
    WireRecord,
    encode_records,
    looks_like_secret,
    parse_usage_value,
)
from quotaflow.settings import QuotaflowSettings
from quotaflow.state import HEARTBEAT_KEY, QuotaState, heartbeat_json
from quotaflow_stream.aggregate import add_records
from quotaflow_stream.evaluate import ACTIVE_SOURCE_SECONDS, evaluate, scopes_for
from quotaflow_stream.snapshot import SnapshotWriter

log = logging.getLogger(__name__)

DLQ_REASON_HEADER = "quotaflow-dlq-reason"
DLQ_ORIGIN_HEADER = "quotaflow-dlq-origin"


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
        # key -> [last usage (worker clock), last publication]
        self._active: dict[str, list[float]] = {}
        # source -> last usage from it (worker clock): the fleet size heartbeats announce
        self._sources: dict[str, float] = {}
        # keys whose usage changed since their state was last published
        self._dirty: set[str] = set()
        t = settings.topics
        self.usage_topic = self._raw_topic(t.usage, usage_partitions)
        self.decisions_topic = self._raw_topic(t.decisions, usage_partitions)
        self.dlq_topic = self._raw_topic(t.dlq, None)
        self.table = app.Table("aggregates", default=None, partitions=usage_partitions)
        app.agent(self.usage_topic, name="aggregate-usage")(self._aggregate)
        app.timer(settings.worker.heartbeat_interval)(self._refresh)
        app.timer(settings.worker.publish_interval)(self._publish_dirty)
        app.timer(settings.worker.snapshot_interval)(self._flush_snapshot)
        #: The latest state published per key this worker owns (the API and dashboard read it).
        self.latest: dict[str, QuotaState] = {}
        #: Newest record's event time to its state's publication, for recent states (ms).
        self.latencies_ms: deque[float] = deque(maxlen=2000)
        #: Times a key went from open to throttled.
        self.throttle_onsets = 0

    # -- the agent ---------------------------------------------------------------------------

    async def _aggregate(self, stream: Any) -> None:
        async for event in stream.events():
            try:
                await self.process_message(event.message, event.value)
            except Exception as exc:  # never let one message stop the worker
                log.exception("unexpected error on usage message; sent to the DLQ")
                reason = f"internal error: {type(exc).__name__}: {exc}"
                await self._dead_letter(event.message, Rejected(event.value or b"", reason))

    async def process_message(self, message: Any, value: bytes | None) -> None:
        c = self.counters
        c.messages += 1
        records, rejected = parse_usage_value(value)
        for bad in rejected:
            await self._dead_letter(message, bad)
        now = self.clock()
        skew = self.settings.worker.max_future_skew
        by_key: dict[str, list[WireRecord]] = defaultdict(list)
        misrouted: dict[int, list[WireRecord]] = defaultdict(list)
        for record in records:
            if record.ts > now + skew:
                raw = record.to_json()
                reason = f"ts: {record.ts} is more than {skew:g}s ahead of the worker clock"
                await self._dead_letter(message, Rejected(raw, reason))
                continue
            home = partition_for(record.key.encode(), self.partitions)
            if home != message.partition:
                misrouted[home].append(record)
            else:
                by_key[record.key].append(record)
        for home, recs in misrouted.items():
            await self.usage_topic.send(
                key=recs[0].key.encode(), value=encode_records(recs), partition=home
            )
            c.forwarded += len(recs)
        grace = self.settings.worker.grace_seconds
        horizon = self.settings.worker.dedup_horizon
        if by_key and c.first_record_at is None:
            c.first_record_at = time.time()
        sources = self._sources
        for key, recs in by_key.items():
            for r in recs:
                sources[r.source] = now
            entry = self.table.get(key)
            dups_before = entry.get("dup", 0) if entry else 0
            entry, late = add_records(entry, recs, self._scopes_for, grace, horizon, now)
            self.table[key] = entry
            duplicates = entry["dup"] - dups_before
            c.duplicates += duplicates
            c.records += len(recs) - duplicates
            c.late += late
            self._active[key] = [now, now]
            self._dirty.add(key)
        if by_key:
            c.last_record_at = time.time()

    async def _publish_dirty(self) -> None:
        """Publish the state of every key whose usage changed since the last tick."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        now = self.clock()
        for key in dirty:
            entry = self.table.get(key)
            if entry is not None:
                state = await self._publish(key, entry, now)
                self.latencies_ms.append(max(now - state.watermark, 0.0) * 1000)

    async def _publish(self, key: str, entry: dict[str, Any], now: float) -> QuotaState:
        state = evaluate(key, entry, self.policies, now)
        before = self.latest.get(key)
        if state.throttled and (before is None or not before.throttled):
            self.throttle_onsets += 1
        self.latest[key] = state
        payload = state.to_json()
        await self.decisions_topic.send(key=key.encode(), value=payload)
        self.snapshot.put(key, payload)
        self.counters.states_published += 1
        return state

    def current_state(self, key: str) -> QuotaState | None:
        """The key's state now, if this worker owns it (evaluated afresh: windows slide)."""
        entry = self.table.get(key)
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
        for key, times in list(self._active.items()):
            entry = self.table.get(key) if times[0] >= horizon else None
            if entry is None:
                del self._active[key]
                continue
            if now - times[1] >= w.refresh_interval:
                times[1] = now
                await self._publish(key, entry, now)
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
