"""One id contract: the ids the SDK mints are the ids the worker's compact memory takes, and the
fold's inlined id checks agree with :mod:`quotaflow_stream.dedup`."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow import QuotaClient, load_settings
from quotaflow.ids import SDK_ID, IdMinter, parse_sdk_id, record_id
from quotaflow.policies import parse_policies
from quotaflow.record import WireRecord
from quotaflow.transports import MemoryTransport
from quotaflow_stream import dedup
from quotaflow_stream.aggregate import fold_records
from quotaflow_stream.entry import new_entry
from quotaflow_stream.evaluate import scopes_for

T0 = 1_700_000_000.0
SCOPES = scopes_for(parse_policies({"version": 1, "policies": []}))


def fold_ids(ids: list[str]) -> tuple[dict, list[bool]]:
    """Fold one record per id into a fresh entry; return it and which records counted."""
    entries: dict = {}
    counted = []
    for i, rid in enumerate(ids):
        record = WireRecord(id=rid, ts=T0 + i * 0.001, key="k", model="m", source="s")
        _, dups = fold_records(entries, [record], SCOPES, 10.0, now=T0)
        counted.append(dups == 0)
    return entries.get("k", new_entry()), counted


prefixes = st.sampled_from(["0" * 16, "ab" * 8, "f" * 16])
sdk_ids = st.tuples(prefixes, st.integers(min_value=0, max_value=300)).map(
    lambda pc: record_id(*pc)
)
foreign_ids = st.sampled_from(["gw-req-1", "gw-req-2", "import:7", "ABCDEF0123456789-1", "x"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(sdk_ids, foreign_ids), max_size=120))
def test_the_folds_inlined_id_checks_agree_with_the_reference(ids: list[str]) -> None:
    _, counted = fold_ids(ids)
    reference = new_entry()
    assert counted == [not dedup.seen(reference, rid, T0) for rid in ids]


def test_every_id_the_client_mints_takes_the_compact_path() -> None:
    """Were the minted format to drift from the one the worker parses, these ids would land in
    the per-id memory (``xid``) and this test would fail, rather than the worker silently
    spending an entry per record."""
    transport = MemoryTransport()
    settings = load_settings(client={"journal": False})
    with QuotaClient(settings, transport=transport, follow=False) as quota:
        for i in range(200):
            quota.record("team", "gpt-4o", prompt_tokens=i)
    minted = [r.id for r in transport.records()]
    assert len(minted) == 200 and all(parse_sdk_id(rid) for rid in minted)
    entry, counted = fold_ids(minted)
    assert all(counted)
    assert list(entry["ids"]) == [quota.ids.prefix] and not entry.get("xid")
    assert entry["ids"][quota.ids.prefix][0] == 199


def test_minted_ids_are_the_contracts_and_count_up() -> None:
    mint = IdMinter()
    ids = [mint() for _ in range(20)]
    assert [parse_sdk_id(rid) for rid in ids] == [(mint.prefix, i) for i in range(20)]
    assert ids == [record_id(mint.prefix, i) for i in range(20)]
    assert all(SDK_ID.fullmatch(rid) for rid in ids)
    assert IdMinter().prefix != mint.prefix


def test_the_benchs_records_take_the_compact_path() -> None:
    from quotaflow_producers.bench.stream import stream_records

    records = stream_records(2_000, keys=10)
    assert all(parse_sdk_id(r.id) for r in records)


def test_an_sdk_instance_is_remembered_within_its_window_and_beyond_it_taken_as_counted() -> None:
    prefix = "ab" * 8
    ids = [record_id(prefix, n) for n in (100, 40, 99, 37, 100, 36, 300, 237, 236)]
    _, counted = fold_ids(ids)
    # 40 and 37 are within 64 of 100: new once; 36 is 64 behind: taken as counted; after 300,
    # 237 is new (63 behind) and 236 is 64 behind
    assert counted == [True, True, True, True, False, False, True, True, False]


def test_foreign_ids_are_remembered_up_to_their_cap_then_the_oldest_counts_again() -> None:
    cap = 10_000  # the README's figure, not the code's constant: the claim is what is tested
    ids = [f"req-{i}" for i in range(cap + 1)]
    entry, counted = fold_ids([*ids, "req-5", "req-0", "req-0"])
    assert all(counted[: cap + 1])
    assert len(entry["xid"]) == cap
    # req-5 is still remembered: dropped; req-0 was forgotten (the oldest): it counts again
    assert counted[cap + 1 :] == [False, True, False]
