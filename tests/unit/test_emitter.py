from __future__ import annotations

import json
import time

from quotaflow.emitter import UsageEmitter
from quotaflow.messages import parse_usage_value
from quotaflow.partitioner import partition_for
from quotaflow.record import UsageRecord
from quotaflow.transports import MemoryTransport


def record(i: int, key: str) -> UsageRecord:
    return UsageRecord(id=f"r{i}", ts=1_700_000_000 + i, key=key, model="m", source="s")


def sent_records(t: MemoryTransport) -> list[UsageRecord]:
    out: list[UsageRecord] = []
    for _, _, _, value in t.sent:
        out.extend(parse_usage_value(value)[0])
    return out


def test_records_are_packed_per_partition_in_order() -> None:
    t = MemoryTransport(partitions=4)
    e = UsageEmitter(t, "usage", max_batch=500, flush_interval=60)
    keys = [f"key-{i % 10}" for i in range(100)]
    for i, key in enumerate(keys):
        e.emit(record(i, key))
    assert e.close() == 0 and t.flushed
    # one message per partition that has records
    partitions = [p for _, p, _, _ in t.sent]
    assert sorted(partitions) == sorted({partition_for(k.encode(), 4) for k in keys})
    for _, partition, _, value in t.sent:
        recs = parse_usage_value(value)[0]
        assert {partition_for(r.key.encode(), 4) for r in recs} == {partition}
        ids = [int(r.id[1:]) for r in recs]
        assert ids == sorted(ids), "per-partition order is kept"
    assert sorted(r.id for r in sent_records(t)) == sorted(f"r{i}" for i in range(100))


def test_batches_are_bounded_by_max_batch() -> None:
    t = MemoryTransport(partitions=1)
    e = UsageEmitter(t, "usage", max_batch=7, flush_interval=60)
    for i in range(20):
        e.emit(record(i, "k"))
    e.close()
    sizes = [len(json.loads(v)) if v.startswith(b"[") else 1 for _, _, _, v in t.sent]
    assert sizes == [7, 7, 6]
    assert [r.id for r in sent_records(t)] == [f"r{i}" for i in range(20)]


def test_unknown_partition_count_groups_by_key() -> None:
    t = MemoryTransport(partitions=None)
    e = UsageEmitter(t, "usage", flush_interval=60)
    for i in range(6):
        e.emit(record(i, f"k{i % 2}"))
    e.close()
    assert {(p, k) for _, p, k, _ in t.sent} == {(None, b"k0"), (None, b"k1")}


def test_a_full_transport_loses_nothing_and_keeps_order() -> None:
    t = MemoryTransport(partitions=1, refuse=3)
    e = UsageEmitter(t, "usage", max_batch=2, flush_interval=0.001)
    e.start()
    for i in range(10):
        e.emit(record(i, "k"))
    e.close(timeout=5)
    assert [r.id for r in sent_records(t)] == [f"r{i}" for i in range(10)]


def test_overflow_beyond_the_memory_bound_is_counted_and_handed_over() -> None:
    spilled: list[UsageRecord] = []
    t = MemoryTransport()
    e = UsageEmitter(t, "usage", max_buffered=3, flush_interval=60, on_overflow=spilled.append)
    for i in range(5):
        e.emit(record(i, "k"))
    assert e.overflowed == 2 and [r.id for r in spilled] == ["r3", "r4"]
    e.close()


def test_observers_see_each_record_once_as_it_is_sent_and_cannot_stop_delivery() -> None:
    t = MemoryTransport(partitions=1, refuse=3)
    e = UsageEmitter(t, "usage", max_batch=2, flush_interval=0.001)
    seen: list[str] = []

    def broken(chunk: list[object]) -> None:
        raise RuntimeError("an exporter failing")

    e.observers.extend([lambda chunk: seen.extend(r.id for r in chunk), broken])  # type: ignore[attr-defined]
    e.start()
    for i in range(10):
        e.emit(record(i, "k"))
    e.close(timeout=5)
    # refused sends went back to the buffer: observed only when they were really handed over
    assert seen == [f"r{i}" for i in range(10)]
    assert [r.id for r in sent_records(t)] == seen


def _wait_for_messages(t: MemoryTransport, count: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while len(t.sent) < count and time.monotonic() < deadline:
        time.sleep(0.002)
    return len(t.sent) >= count


def test_a_record_finding_the_emitter_idle_goes_at_once_and_later_ones_are_batched() -> None:
    t = MemoryTransport(partitions=1)
    e = UsageEmitter(t, "usage", flush_interval=30)
    e.start()
    try:
        time.sleep(0.05)  # the emitter waits, idle
        e.emit(record(0, "k"))
        # not after the 30 s interval: the first record after a quiet spell is sent at once
        assert _wait_for_messages(t, 1, within=5)
        for i in range(1, 11):
            e.emit(record(i, "k"))
        time.sleep(0.3)
        # within the interval after a flush, records wait for the next one, together
        assert len(t.sent) == 1
    finally:
        assert e.close(timeout=5) == 0
    assert len(t.sent) == 2
    assert [r.id for r in sent_records(t)] == [f"r{i}" for i in range(11)]


def test_a_full_batch_goes_without_waiting_out_the_interval() -> None:
    t = MemoryTransport(partitions=1)
    e = UsageEmitter(t, "usage", max_batch=5, flush_interval=30)
    e.start()
    try:
        e.emit(record(0, "k"))
        assert _wait_for_messages(t, 1, within=5)
        for i in range(1, 6):
            e.emit(record(i, "k"))
        assert _wait_for_messages(t, 2, within=5)
        assert [r.id for r in sent_records(t)] == [f"r{i}" for i in range(6)]
    finally:
        e.close(timeout=5)
