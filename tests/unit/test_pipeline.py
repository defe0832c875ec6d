"""The worker's pipeline and publisher without a broker: in-memory stand-ins for Faust's stream,
table and topics, the bulk producer and the snapshot (``tests/support/fakes.py``). The same
paths run against the real broker in ``tests/integration/test_pipeline.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from quotaflow.ids import record_id
from quotaflow.messages import encode_records
from quotaflow.partitioner import partition_of
from quotaflow.policies import parse_policies
from quotaflow.record import WireRecord
from quotaflow.settings import WorkerSettings
from quotaflow.state import HEARTBEAT_KEY, QuotaState
from quotaflow_stream.counters import Counters
from quotaflow_stream.deadletters import DLQ_REASON_HEADER, DeadLetters
from quotaflow_stream.evaluate import scopes_for
from quotaflow_stream.pipeline import UsagePipeline
from quotaflow_stream.publisher import PUBLISH_SLICE, StatePublisher
from quotaflow_stream.store import SAVE_MARKER, AggregateStore
from tests.support.fakes import (
    CHANGELOG,
    FakeEvent,
    FakeMessage,
    FakeOutput,
    FakeSnapshot,
    FakeStream,
    FakeTable,
    FakeTopic,
)

PARTS = 4
NOW = 1_700_000_000.0
POLICIES = parse_policies(
    {
        "version": 1,
        "policies": [{"name": "all", "keys": ["*"], "limits": {"requests_per_minute": 1000}}],
    }
)


class Ticker:
    """A monotonic clock that advances ``step`` seconds each time it is read."""

    def __init__(self, step: float = 0.0) -> None:
        self.now = 100.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class Parts:
    def __init__(self, monotonic: Callable[[], float] | None = None, **worker: Any) -> None:
        self.settings = WorkerSettings(**worker)
        self.table, self.output, self.snapshot = FakeTable(), FakeOutput(), FakeSnapshot()
        self.forward, self.dlq, self.beats = FakeTopic("usage"), FakeTopic("dlq"), FakeTopic()
        self.counters = Counters()
        self.ready = True
        self.store = AggregateStore(
            self.table, PARTS, self.output, scopes_for=scopes_for(POLICIES), grace=10
        )
        self.publisher = StatePublisher(
            self.settings, POLICIES, self.store, self.output, self.snapshot, self.beats,
            decisions_topic="decisions", partitions=PARTS, counters=self.counters,
            ready=lambda: self.ready, clock=lambda: NOW, monotonic=monotonic or Ticker(),
        )  # fmt: skip
        self.pipeline = UsagePipeline(
            self.settings, self.store, self.publisher, DeadLetters(self.dlq, self.counters),
            self.forward, partitions=PARTS, counters=self.counters, clock=lambda: NOW,
        )  # fmt: skip

    def states(self) -> list[QuotaState]:
        return [QuotaState.from_json(v) for k, v, _ in self.output.to("decisions")]


def keys_of(partition: int, count: int, prefix: str = "key") -> list[str]:
    """``count`` counter keys that hash to ``partition``."""
    found = (f"{prefix}-{i}" for i in range(100_000))
    keys = [k for k in found if partition_of(k, PARTS) == partition]
    return keys[:count]


def records(keys: list[str], start: int = 0, ts: float = NOW) -> list[WireRecord]:
    return [
        WireRecord(
            id=record_id("ab" * 8, start + i),
            ts=ts,
            key=k,
            model="m",
            prompt_tokens=7,
            source="svc-1",
        )
        for i, k in enumerate(keys)
    ]


def event(partition: int, offset: int, value: bytes) -> FakeEvent:
    return FakeEvent(FakeMessage(partition=partition, offset=offset, key=b"k"), value)


async def consuming(parts: Parts, stream: FakeStream) -> asyncio.Task[None]:
    task = asyncio.create_task(parts.pipeline.consume(stream))
    await stream.drained()
    return task


def test_messages_are_acked_only_after_the_save_covering_them_is_delivered() -> None:
    async def run() -> None:
        parts = Parts()
        k0, k1 = keys_of(0, 3), keys_of(1, 3)
        stream = FakeStream([event(0, 0, encode_records(records(k0))),
                             event(1, 0, encode_records(records(k1, 10)))])  # fmt: skip
        task = await consuming(parts, stream)
        assert parts.counters.records == 6 and stream.acked == []
        assert parts.pipeline.unacked_messages == 2
        # the broker is slow to confirm the changelog: a save is under way, nothing acked
        parts.output.hold = asyncio.Event()
        saving = asyncio.create_task(parts.pipeline.save())
        await asyncio.sleep(0.01)
        assert stream.acked == [] and parts.pipeline.unacked_messages == 2
        assert parts.store.stats()["unsaved_entries"] == 6, "a save under way is unsaved"
        # a message folded meanwhile waits for the next save
        stream.put(event(0, 1, encode_records(records(k0[:1], 20))))
        await stream.drained()
        parts.output.hold.set()
        assert await saving is True
        assert [(e.message.partition, e.message.offset) for e in stream.acked] == [(0, 0), (1, 0)]
        saved = {k.decode() for k, _, _ in parts.output.to(CHANGELOG) if k != SAVE_MARKER}
        assert saved == set(k0) | set(k1)
        # a save the broker refuses acks nothing; the next one acks it
        parts.output.hold, parts.output.fail = None, True
        assert await parts.pipeline.save() is False
        assert len(stream.acked) == 2 and parts.pipeline.unacked_messages == 1
        parts.output.fail = False
        assert await parts.pipeline.save() is True
        assert [(e.message.partition, e.message.offset) for e in stream.acked][-1] == (0, 1)
        stream.close()
        await task

    asyncio.run(run())


def test_misrouted_records_are_forwarded_to_their_partition_and_counted_there_only() -> None:
    async def run() -> None:
        parts = Parts()
        here, there, elsewhere = keys_of(0, 2), keys_of(2, 3), keys_of(3, 1)
        mixed = records([here[0], *there, here[1], *elsewhere])
        await parts.pipeline.process_message(
            FakeMessage(partition=0, offset=5), encode_records(mixed)
        )
        assert set(parts.store.entries) == set(here)
        assert parts.counters.records == 2 and parts.counters.forwarded == 4
        sent = {m["partition"]: json.loads(m["value"]) for m in parts.forward.sent}
        assert set(sent) == {2, 3}
        assert sorted(r["key"] for r in sent[2]) == sorted(there)  # one message per partition
        assert sent[3]["key"] == elsewhere[0]  # a lone record goes as an object
        assert all(m["key"] for m in parts.forward.sent)

    asyncio.run(run())


def test_bad_records_reach_the_dead_letters_and_the_good_ones_beside_them_count() -> None:
    async def run() -> None:
        parts = Parts()
        key = keys_of(1, 1)[0]
        good, future = records([key, key])
        future = WireRecord(**{**{f: getattr(future, f) for f in future.__struct_fields__},
                               "ts": NOW + 3600})  # fmt: skip
        bad = {"id": "x-1", "ts": NOW, "key": key, "model": "m", "prompt_tokens": -5,
               "source": "svc-1"}  # fmt: skip
        value = (
            b"[" + b",".join([good.to_json(), json.dumps(bad).encode(), future.to_json()]) + b"]"
        )
        message = FakeMessage(partition=1, offset=9, key=b"sk-live-leaked")
        await parts.pipeline.process_message(message, value)
        await parts.pipeline.process_message(FakeMessage(partition=1, offset=10), b"not json")
        assert parts.counters.records == 1 and parts.store.entries[key]["t"][0] == 1
        reasons = [m["headers"][DLQ_REASON_HEADER].decode() for m in parts.dlq.sent]
        assert len(reasons) == 3 == parts.counters.dlq
        assert "[1].prompt_tokens" in reasons[0]
        assert "ahead of the worker clock" in reasons[1]
        assert reasons[2].startswith("not JSON")
        assert b"sk-live-leaked" not in parts.dlq.sent[0]["key"], "a credential key is redacted"

    asyncio.run(run())


def test_an_error_inside_the_pipeline_dead_letters_the_message_and_goes_on() -> None:
    async def run() -> None:
        parts = Parts()

        def broken(records: Any, now: float) -> Any:
            raise KeyError("boom")

        parts.store.fold = broken  # type: ignore[method-assign]
        stream = FakeStream([event(0, 0, encode_records(records(keys_of(0, 1))))])
        task = await consuming(parts, stream)
        assert parts.counters.dlq == 1 and "internal error: KeyError" in (
            parts.dlq.sent[0]["headers"][DLQ_REASON_HEADER].decode()
        )
        assert parts.pipeline.unacked_messages == 1, "acked with the next save, not lost"
        stream.close()
        await task

    asyncio.run(run())


def test_a_failed_publication_after_a_message_leaves_its_keys_due_and_goes_on() -> None:
    async def run() -> None:
        parts = Parts()

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("producer gone")

        parts.output.send = broken  # type: ignore[method-assign]
        k0, k1 = keys_of(0, 2)
        stream = FakeStream([event(0, 0, encode_records(records([k0]))),
                             event(0, 1, encode_records(records([k1], 1)))])  # fmt: skip
        task = await consuming(parts, stream)
        # both folded, neither dead-lettered: the fold was fine, only the publication failed
        assert parts.counters.records == 2 and parts.counters.dlq == 0
        assert parts.pipeline.unacked_messages == 2
        assert set(parts.publisher.dirty) == {k0, k1}, "the tick publishes them later"
        stream.close()
        await task

    asyncio.run(run())


def test_states_go_out_once_per_key_oldest_change_first() -> None:
    async def run() -> None:
        parts = Parts()
        keys = keys_of(0, 5)
        for offset, batch in enumerate([keys[:3], keys[1:4], keys[4:], keys[:1]]):
            value = encode_records(records(batch, offset * 10))
            await parts.pipeline.process_message(FakeMessage(0, offset), value)
        await parts.publisher.publish_dirty()
        published = [s.key for s in parts.states()]
        # each key once, in the order of the message that first changed it
        assert len(published) == len(keys)
        assert set(published[:3]) == set(keys[:3]) and published[3:] == keys[3:]
        assert set(parts.snapshot.states) == set(keys)
        first = next(s for s in parts.states() if s.key == keys[0])
        assert first.totals.records == 2 and first.sources["svc-1"] == NOW

    asyncio.run(run())


#: What the README claims publication takes at most under a backlog (the code's own constant
#: is what is tested, so it is not read from there).
README_SHARE = 0.2


def costly_states(parts: Parts, ticker: Ticker) -> None:
    """Each state published costs 1 ms of the ticker's (fake) time."""
    send = parts.output.send

    def costly_send(*args: Any, **kwargs: Any) -> None:
        ticker.now += 0.001
        send(*args, **kwargs)

    parts.output.send = costly_send  # type: ignore[method-assign]


async def fold_backlog(parts: Parts, prefix: str = "p") -> list[str]:
    """150 keys' records folded on each partition: the keys, in the order they are due."""
    keys = [k for p in range(PARTS) for k in keys_of(p, 150, f"{prefix}{p}")]
    for p in range(PARTS):
        mine = [k for k in keys if partition_of(k, PARTS) == p]
        await parts.pipeline.process_message(FakeMessage(p, 0), encode_records(records(mine)))
    return list(parts.publisher.dirty)


def test_the_publication_slice_holds_under_a_backlog() -> None:
    """Each state costs 1 ms of (fake) time: a tick stops within its slice of the interval,
    the next tick waits until publication is back to its share of time while records are
    still being folded, and the keys left over go first next time; every key is published
    once in the end."""

    async def run() -> None:
        ticker = Ticker()
        parts = Parts(monotonic=ticker, publish_interval=0.2)
        costly_states(parts, ticker)
        backlog = await fold_backlog(parts)
        busy = keys_of(0, 1, "busy")[0]
        offset = 0

        async def fold_more() -> None:  # the backlog goes on between ticks
            nonlocal offset
            offset += 1
            more = records([busy], start=10_000 + offset)
            await parts.pipeline.process_message(FakeMessage(0, offset), encode_records(more))

        started = ticker.now
        await parts.publisher.publish_dirty()
        spent = ticker.now - started
        first = len(parts.states())
        assert 0 < first < len(backlog)
        # the slice is checked every 64 states: at most 64 states past it
        assert spent <= PUBLISH_SLICE * 0.2 + 64 * 0.001 + 0.01
        assert [s.key for s in parts.states()] == backlog[:first]
        await fold_more()
        await parts.publisher.publish_dirty()  # too soon: publication would exceed its share
        assert len(parts.states()) == first
        # the README's claim: publication takes at most 20 % of the worker's time
        ticker.now = started + spent / README_SHARE * 0.95
        await fold_more()
        await parts.publisher.publish_dirty()
        assert len(parts.states()) == first, "publication went past 20 % of the time"
        ticker.now = started + spent / README_SHARE  # the share's wait has passed
        await fold_more()
        await parts.publisher.publish_dirty()
        assert [s.key for s in parts.states()][first:] == backlog[first : len(parts.states())]
        while parts.publisher.dirty:
            ticker.now += 10
            await parts.publisher.publish_dirty()
        assert sorted(s.key for s in parts.states()) == sorted([*backlog, busy])

    asyncio.run(run())


def test_once_the_backlog_is_folded_the_states_due_go_out_tick_after_tick() -> None:
    """Nothing left to fold: no wait for publication's share of time, which would leave the
    fleet on old counts for minutes after a catch-up of thousands of keys."""

    async def run() -> None:
        ticker = Ticker()
        parts = Parts(monotonic=ticker, publish_interval=0.2)
        costly_states(parts, ticker)
        backlog = await fold_backlog(parts)
        await parts.publisher.publish_dirty()
        first = len(parts.states())
        assert 0 < first < len(backlog)
        ticks = 1
        while parts.publisher.dirty:
            ticker.now += 0.2  # the next tick, one interval later: never too soon
            await parts.publisher.publish_dirty()
            ticks += 1
            assert len(parts.states()) >= min(first * ticks, len(backlog)) - 64 * ticks
        assert sorted(s.key for s in parts.states()) == sorted(backlog)
        assert ticks <= len(backlog) // first + 2, "each tick publishes a full slice"

    asyncio.run(run())


def test_usage_finding_publication_idle_goes_out_without_waiting_for_the_tick() -> None:
    """The tick runs on its own clock: a message folded when nothing was published for an
    interval is published at once by the agent; one folded within the interval after a
    publication waits for the next tick, so a busy worker still publishes once per interval."""

    async def run() -> None:
        ticker = Ticker()
        parts = Parts(monotonic=ticker, publish_interval=0.2)
        k1, k2, k3 = keys_of(0, 3)
        stream = FakeStream([event(0, 0, encode_records(records([k1])))])
        task = await consuming(parts, stream)
        assert [s.key for s in parts.states()] == [k1], "published by the agent, no tick ran"
        ticker.now += 0.05
        stream.put(event(0, 1, encode_records(records([k2], 1))))
        await stream.drained()
        assert len(parts.states()) == 1 and k2 in parts.publisher.dirty, "within the interval"
        await parts.publisher.publish_dirty()  # the tick
        ticker.now += 0.1
        stream.put(event(0, 2, encode_records(records([k3], 2))))
        await stream.drained()
        assert [s.key for s in parts.states()] == [k1, k2], "the tick published within 0.2 s"
        await parts.publisher.publish_dirty()  # the next tick
        ticker.now += 0.1
        await parts.publisher.publish_dirty()  # a tick with nothing due is no publication
        ticker.now += 0.11
        stream.put(event(0, 3, encode_records(records([k1], 3))))
        await stream.drained()
        assert [s.key for s in parts.states()] == [k1, k2, k3, k1]
        stream.close()
        await task

    asyncio.run(run())


def test_publishing_as_messages_are_folded_keeps_publication_within_its_share() -> None:
    """A worker folding a message every 2 ms, each touching 20 keys whose states cost 1 ms
    apiece: publication after each message (and the tick every 10 ms) still takes at most
    its share of the worker's time, as the tick alone does."""

    async def run() -> None:
        ticker = Ticker()
        parts = Parts(monotonic=ticker, publish_interval=0.01)
        costly_states(parts, ticker)
        keys = keys_of(0, 20)
        started = ticker.now
        for i in range(500):
            ticker.now += 0.002
            value = encode_records(records(keys, start=i * 100))
            await parts.pipeline.process_message(FakeMessage(0, i), value)
            await parts.publisher.publish_if_idle()
            if i % 5 == 0:
                await parts.publisher.publish_dirty()  # the tick
        elapsed = ticker.now - started
        assert parts.counters.states_published >= 20, "states went out meanwhile"
        assert parts.counters.seconds_publishing <= (README_SHARE + 0.05) * elapsed

    asyncio.run(run())


def test_refresh_republishes_quiet_active_keys_and_beats_on_every_partition() -> None:
    async def run() -> None:
        parts = Parts()
        key = keys_of(2, 1)[0]
        await parts.pipeline.process_message(FakeMessage(2, 0), encode_records(records([key])))
        await parts.publisher.publish_dirty()
        await parts.publisher.refresh()
        assert not parts.publisher.dirty, "published just now: not due"
        assert sorted(m["partition"] for m in parts.beats.sent) == list(range(PARTS))
        assert all(m["key"] == HEARTBEAT_KEY.encode() for m in parts.beats.sent)
        assert json.loads(parts.beats.sent[0]["value"])["instances"] == 1
        parts.publisher.clock = lambda: NOW + parts.settings.refresh_interval + 1
        await parts.publisher.refresh()
        assert list(parts.publisher.dirty) == [key]

    asyncio.run(run())


def test_a_rebalance_saves_first_and_publishes_recovered_keys_once_ready() -> None:
    async def run() -> None:
        parts = Parts()
        k0, k3 = keys_of(0, 2), keys_of(3, 2)
        stream = FakeStream([event(0, 0, encode_records(records(k0))),
                             event(3, 0, encode_records(records(k3, 10)))])  # fmt: skip
        task = await consuming(parts, stream)
        await parts.pipeline.revoked({3})
        assert len(stream.acked) == 2, "saved and acked before letting go"
        assert set(parts.store.entries) == set(k0) and not set(parts.publisher.dirty) & set(k3)
        parts.ready = False
        parts.pipeline.assigned({0})
        await parts.publisher.publish_dirty()
        parts.output.sent.clear()
        parts.publisher.dirty.clear()
        await parts.publisher.publish_dirty()
        assert parts.states() == [], "not ready: nothing announced yet"
        parts.ready = True
        await parts.publisher.publish_dirty()
        assert sorted(s.key for s in parts.states()) == sorted(k0)
        stream.close()
        await task

    asyncio.run(run())


def test_only_usage_publications_are_decisions_in_the_latency() -> None:
    """A refresh republishes a key whose newest record is minutes old: that is not a decision
    taking minutes (the worker's p99 once read 26 s from such states). Each publication is
    counted by why; the latency is measured for usage-driven ones only."""

    async def run() -> None:
        parts = Parts()
        key, other = keys_of(1, 2)
        old = NOW - 100  # records produced 100 s before the worker folds them: late, but real
        await parts.pipeline.process_message(
            FakeMessage(1, 0), encode_records(records([key], ts=NOW - 0.05) + records([other],
                                                                                     ts=old))
        )  # fmt: skip
        await parts.publisher.publish_dirty()
        assert sorted(round(ms) for ms in parts.publisher.latencies_ms) == [50, 100_000]
        # later, with no new usage: the refresh republishes both, which is no decision
        later = NOW + parts.settings.refresh_interval + 1
        parts.publisher.clock = lambda: later
        await parts.publisher.refresh()
        assert parts.publisher.dirty == {key: "refresh", other: "refresh"}
        # usage arriving for one of them before the tick makes it a decision again
        parts.publisher.changed([key], ["svc-1"], later)
        parts.publisher.due([key, other], "policy")  # never downgrades usage
        assert parts.publisher.dirty == {key: "usage", other: "refresh"}
        parts.publisher._publish_after = 0.0
        await parts.publisher.publish_dirty()
        assert len(parts.publisher.latencies_ms) == 3  # the refresh added none
        assert parts.publisher.published_by_reason == {
            "usage": 3, "refresh": 1, "recovery": 0, "policy": 0,
        }  # fmt: skip

    asyncio.run(run())
