"""The emitter's journal: records past the memory bound go to disk while the transport is
full, and come back in order, original ids and timestamps, once it takes them again."""

from __future__ import annotations

import time
from pathlib import Path

from quotaflow.emitter import UsageEmitter
from quotaflow.journal import Journal
from quotaflow.record import UsageRecord
from quotaflow.transports import MemoryTransport
from tests.support import wait_for


def rec(i: int) -> UsageRecord:
    return UsageRecord(id=f"r-{i}", ts=1.7e9 + i, key=f"k{i % 3}", model="m", source="s")


def emitter(transport: MemoryTransport, journal: Journal) -> UsageEmitter:
    e = UsageEmitter(transport, "usage", max_batch=20, flush_interval=0.01, max_buffered=50,
                     journal=journal)  # fmt: skip
    e.start()
    return e


def test_an_outage_spills_to_the_journal_and_replays_in_order(tmp_path: Path) -> None:
    transport = MemoryTransport()
    transport.down = True
    journal = Journal(tmp_path / "j", max_bytes=1 << 24)
    e = emitter(transport, journal)
    started = time.perf_counter()
    for i in range(500):
        e.emit(rec(i))
    assert time.perf_counter() - started < 0.5, "emit() never waits for the disk"
    wait_for(lambda: journal.written == 450, what="the overflow journaled")
    assert list((tmp_path / "j").glob("journal*.jsonl"))
    transport.down = False
    wait_for(lambda: len(transport.records()) == 500, what="everything delivered")
    got = transport.records()
    by_key: dict[str, list[int]] = {}
    for r in got:
        by_key.setdefault(r.key, []).append(int(r.id.split("-")[1]))
    for ids in by_key.values():
        assert ids == sorted(ids), "each key's records arrive in the order they were emitted"
    assert {r.id for r in got} == {f"r-{i}" for i in range(500)}
    assert all(r.ts == 1.7e9 + int(r.id.split("-")[1]) for r in got), "original timestamps"
    wait_for(lambda: not journal, what="the journal drained")
    assert not list((tmp_path / "j").glob("journal*.jsonl")), "replayed segments are deleted"
    e.emit(rec(500))
    wait_for(lambda: len(transport.records()) == 501, what="memory mode again")
    assert e.close() == 0


def test_a_journal_outlives_its_process(tmp_path: Path) -> None:
    transport = MemoryTransport()
    transport.down = True
    e = emitter(transport, Journal(tmp_path / "j", max_bytes=1 << 24))
    for i in range(120):
        e.emit(rec(i))
    # the broker is still away: what is left goes to disk, and counts as undelivered
    assert e.close(timeout=0.2) == 120
    assert not transport.records()
    # the next process (same journal directory) sends the old records first
    transport.down = False
    again = emitter(transport, Journal(tmp_path / "j", max_bytes=1 << 24))
    again.emit(rec(1000))
    wait_for(lambda: len(transport.records()) == 121, what="the old journal replayed")
    ids = [r.id for r in transport.records()]
    assert ids[-1] == "r-1000" and sorted(ids[:-1], key=lambda s: int(s[2:])) == ids[:-1]
    assert again.close() == 0


def test_the_cap_drops_and_counts(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", max_bytes=1 << 20)
    big = [rec(i) for i in range(20_000)]
    written = journal.append(big)
    assert 0 < written < 20_000 and journal.dropped == 20_000 - written
    assert sum(p.stat().st_size for p in (tmp_path / "j").glob("journal*.jsonl")) <= 1 << 20
