"""The worker's aggregate store and batched fold, without a broker: a fake table (Faust's
``data`` store and changelog topic) and a fake bulk producer that records what it was sent."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from quotaflow.partitioner import partition_for
from quotaflow.record import WireRecord
from quotaflow_stream.aggregate import add_records, fold_records
from quotaflow_stream.store import SAVE_MARKER, AggregateStore
from tests.support.fakes import FakeOutput, FakeTable
from tests.unit.test_aggregate import SCOPES

PARTS = 4
T0 = 1_700_000_000.0


def rec(i: int, key: str, ts: float = T0, source: str = "s1", pt: int = 10) -> WireRecord:
    return WireRecord(
        id=f"{'a' * 15}{source[-1]}-{i:x}", ts=ts, key=key, model="m", prompt_tokens=pt,
        source=source,
    )  # fmt: skip


def store() -> tuple[AggregateStore, FakeTable, FakeOutput]:
    table, out = FakeTable(), FakeOutput()
    return AggregateStore(table, PARTS, out, scopes_for=SCOPES, grace=10), table, out


def test_a_message_of_many_keys_folds_like_one_key_at_a_time() -> None:
    records = [rec(i, f"k{i % 3}", T0 + i * 0.1) for i in range(30)]
    entries: dict[str, Any] = {}
    touched: set[str] = set()
    late, dups = fold_records(entries, records, SCOPES, 10, now=T0 + 5, touched=touched)
    assert (late, dups) == (0, 0) and touched == {"k0", "k1", "k2"}
    for key in touched:
        alone, _ = add_records(None, [r for r in records if r.key == key], SCOPES, 10, now=T0 + 5)
        assert entries[key] == alone


def test_duplicates_are_dropped_but_still_mark_their_key() -> None:
    entries: dict[str, Any] = {}
    fold_records(entries, [rec(1, "k1"), rec(2, "k1")], SCOPES, 10, now=T0)
    touched: set[str] = set()
    _, dups = fold_records(entries, [rec(2, "k1")], SCOPES, 10, now=T0, touched=touched)
    assert dups == 1 and entries["k1"]["t"][0] == 2 and touched == {"k1"}


def test_a_missing_key_is_loaded_before_it_starts_afresh() -> None:
    saved, _ = add_records(None, [rec(1, "k1")], SCOPES, 10, now=T0)
    entries: dict[str, Any] = {}

    def load(key: str) -> Any:
        return json.loads(json.dumps(saved)) if key == "k1" else None

    fold_records(entries, [rec(2, "k1"), rec(1, "k9")], SCOPES, 10, now=T0, load=load)
    assert entries["k1"]["t"][0] == 2 and entries["k9"]["t"][0] == 1


def test_an_entry_saved_by_an_earlier_version_loads_and_folds() -> None:
    """Entries saved as JSON, before every entry carried "ids" and "m", still load (the
    fold reads those fields without checking)."""
    s, table, _ = store()
    saved, _ = add_records(None, [rec(1, "k1")], SCOPES, 10, now=T0)
    older = {f: v for f, v in saved.items() if f not in ("ids", "m")}
    table.data[b"k1"] = json.dumps(older).encode()
    assert s.fold([rec(2, "k1")], now=T0).touched == {"k1"}
    entry = s.entries["k1"]
    assert entry["t"][0] == 2 and list(entry["m"]) == ["m"] and entry["ids"]


def test_save_writes_each_changed_key_once_to_its_partition() -> None:
    s, _, out = store()
    folded = s.fold([rec(i, f"k{i % 5}") for i in range(50)], now=T0)
    assert folded.touched == s.unsaved == {f"k{i}" for i in range(5)}
    assert asyncio_run(s.save()) == 5
    entries, markers = out.sent[:5], out.sent[5:]
    assert sorted(k for _, k, _, _ in entries) == [f"k{i}".encode() for i in range(5)]
    # then a marker alone on each partition written, so the log ends with a one-record batch
    assert {p for _, _, _, p in markers} == {p for _, _, _, p in entries}
    assert all(k == SAVE_MARKER for _, k, _, _ in markers) and len(markers) == len(set(markers))
    for _, key, value, part in entries:
        assert part == partition_for(key, PARTS)
        # MessagePack, as the JSON the entry would be (tuples read back as lists)
        saved = json.loads(json.dumps(s.entries[key.decode()]))
        assert msgspec.msgpack.decode(value) == saved
    assert not s.unsaved and asyncio_run(s.save()) == 0, "nothing changed, nothing written"


def test_a_failed_save_keeps_the_keys_unsaved() -> None:
    s, _, out = store()
    s.fold([rec(1, "k1")], now=T0)
    out.fail = True
    with pytest.raises(RuntimeError):
        asyncio_run(s.save())
    assert s.unsaved == {"k1"}
    out.fail = False
    assert asyncio_run(s.save()) == 1


def test_revoked_entries_go_back_to_fausts_store_and_load_again() -> None:
    s, table, _ = store()
    keys = [f"k{i}" for i in range(20)]
    fold_records(s.entries, [rec(i, k) for i, k in enumerate(keys)], SCOPES, 10, now=T0)
    revoked = {partition_for(k.encode(), PARTS) for k in keys[:3]}
    moved = [k for k in keys if partition_for(k.encode(), PARTS) in revoked]
    before = {k: json.loads(json.dumps(s.entries[k])) for k in moved}
    assert s.forget(revoked) == len(moved)
    assert all(k not in s.entries for k in moved)
    assert {k.decode() for k in table.data} == set(moved)
    # the partition stays here: the next record of a key continues from what it had
    fold_records(s.entries, [rec(99, moved[0])], SCOPES, 10, now=T0, load=s.load)
    assert s.entries[moved[0]]["t"][0] == before[moved[0]]["t"][0] + 1
    # it moves away: what was parked for it is dropped
    kept = set(range(PARTS)) - revoked
    assert s.release(kept) == len(moved) - 1 and not table.data


def asyncio_run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


def test_keys_in_lists_live_and_recovered_keys_of_those_partitions_only() -> None:
    s, table, _ = store()
    keys = [f"k{i}" for i in range(30)]
    fold_records(s.entries, [rec(i, k) for i, k in enumerate(keys[:10])], SCOPES, 10, now=T0)
    for k in keys[10:]:  # recovered by Faust (or a standby's), not loaded yet
        table.data[k.encode()] = b"{}"
    table.data[SAVE_MARKER] = b""
    mine = {0, 1}
    recovered = {k for k in keys[10:] if partition_for(k.encode(), PARTS) in mine}
    assert set(s.keys_in(mine)) == set(keys[:10]) | recovered
