"""Audit and replay logic that needs no broker: times, grouping, comparison, file rows."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from quotaflow._exceptions import ConfigError
from quotaflow.prices import PriceTable, dollars
from quotaflow.record import UsageRecord
from quotaflow_producers.replay import read_rows
from quotaflow_stream import audit

NOW = 1_763_800_000.0
PRICES = PriceTable()


def rec(i: int, ts: float, key: str = "k", model: str = "m", pt: int = 10) -> UsageRecord:
    return UsageRecord(id=str(i), ts=ts, key=key, model=model, prompt_tokens=pt, source="s")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("15m", NOW - 900),
        ("-2h", NOW - 7200),
        ("1d", NOW - 86400),
        ("1763790000", 1763790000.0),
        ("2025-11-22T08:00:00Z", 1763798400.0),
        ("2025-11-22T08:00:00", 1763798400.0),  # no zone: UTC
    ],
)
def test_times(text: str, expected: float) -> None:
    assert audit.parse_time(text, now=NOW) == expected


def test_a_bad_time_names_the_accepted_forms() -> None:
    with pytest.raises(ConfigError, match=r"not a time: 'yesterday'.*ISO 8601"):
        audit.parse_time("yesterday")


def test_totals_group_by_fields_and_window() -> None:
    records = [rec(1, 7200.5, model="a"), rec(2, 7300, model="b"), rec(3, 10800, model="a")]
    by_model = audit.totals(records, ("key", "model"), None, PRICES)
    # records, requests, prompt, completion, cached, cache write, reasoning, images, cost, unpriced
    assert by_model == {
        ("k", "a"): [2, 2, 20, 0, 0, 0, 0, 0, 0, 2],
        ("k", "b"): [1, 1, 10, 0, 0, 0, 0, 0, 0, 1],
    }
    hourly = audit.totals(records, ("key",), "hour", PRICES)
    assert hourly == {
        ("1970-01-01T02:00:00.000Z", "k"): [2, 2, 20, 0, 0, 0, 0, 0, 0, 2],
        ("1970-01-01T03:00:00.000Z", "k"): [1, 1, 10, 0, 0, 0, 0, 0, 0, 1],
    }


def test_totals_carry_every_unit_and_sum_the_cost_exactly() -> None:
    """A v1 record is priced by the audit from the same table; a priced record keeps its
    cost; one the table cannot price is counted apart, never as free."""
    v1 = rec(1, NOW, model="gpt-4o", pt=1_000_000)
    v2 = UsageRecord(
        id="2", ts=NOW, key="k", model="claude-sonnet-4-5", prompt_tokens=3050,
        cached_prompt_tokens=2000, cache_write_tokens=1000, completion_tokens=300,
        reasoning_tokens=100, images=0, cost_micros=12_345, price_version="genai-prices-x",
        source="s",
    )  # fmt: skip
    unknown = rec(3, NOW, model="house-model")
    [sums] = audit.totals([v1, v2, unknown], ("key",), None, PRICES).values()
    assert sums == [3, 3, 1_003_060, 300, 2000, 1000, 100, 0, 2_500_000 + 12_345, 1]
    assert audit.cost_of(v1, PRICES) == (2_500_000, PRICES.version, "audit")
    assert audit.cost_of(v2, PRICES) == (12_345, "genai-prices-x", "record")
    assert audit.cost_of(unknown, PRICES) == (None, None, "unpriced")
    assert dollars(2_512_345) == "2.512345" and dollars(7) == "0.000007" and dollars(None) == ""


def test_compare_lists_every_differing_field_and_missing_keys() -> None:
    # the recount in totals' layout (records, every unit, cost, unpriced); the worker's figures
    # in reconcile's: records, then every unit and the cost
    recount = {"a": [2, 2, 20, 5, 3, 0, 0, 0, 900, 0], "b": [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]}
    diffs = audit.compare(
        recount,
        {"a": [2, 2, 21, 5, 0, 0, 0, 0, 901], "b": None, "c": [1, 0, 0, 0, 0, 0, 0, 0, 0]},
        "worker",
    )
    assert [str(d) for d in diffs] == [
        "a: worker prompt_tokens = 21, the topic says 20",
        "a: worker cached_prompt_tokens = 0, the topic says 3",
        "a: worker cost_micros = 901, the topic says 900",
        "b: worker records = missing, the topic says 1",
        "c: worker records = 1, the topic says 0",
    ]
    agree = {"a": [2, 2, 20, 5, 3, 0, 0, 0, 900], "b": [1, 1, 1, 1, 0, 0, 0, 0, 0]}
    assert audit.compare(recount, agree, "worker") == []


def test_rows_as_csv_and_jsonl() -> None:
    rows = [audit.row(rec(1, 1.5), PRICES)]
    out = io.StringIO()
    assert audit.write_rows(rows, "csv", out, audit.COLUMNS) == 1
    assert out.getvalue().splitlines()[0] == ",".join(audit.COLUMNS)
    assert "1970-01-01T00:00:01.500Z" in out.getvalue()
    out = io.StringIO()
    audit.write_rows(rows, "jsonl", out, audit.COLUMNS)
    assert out.getvalue().startswith('{"id":"1",')
    with pytest.raises(ConfigError, match="unknown format 'xml'"):
        audit.write_rows(rows, "xml", io.StringIO(), audit.COLUMNS)


def test_replay_reads_csv_as_exported_and_reports_bad_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    priced = rec(3, 3.5, model="gpt-4o")
    rows = [audit.row(r, PRICES) for r in (rec(1, 1.5), rec(2, 2.5), priced)]
    audit.write_rows(rows, "csv", out, audit.COLUMNS)
    path = tmp_path / "trail.csv"
    path.write_text(out.getvalue())
    rows = list(read_rows(path))
    assert [n for n, _ in rows] == [2, 3, 4]
    assert UsageRecord.model_validate(rows[0][1]) == rec(1, 1.5)
    # the audit's price travels with a replayed record, with the version that priced it
    again = UsageRecord.model_validate(rows[2][1])
    assert again.cost_micros == audit.cost_of(priced, PRICES)[0] == 25
    assert again.price_version == PRICES.version
    assert again.model_copy(update={"cost_micros": None, "price_version": None}) == priced
    jsonl = tmp_path / "trail.jsonl"
    with jsonl.open("w") as handle:
        audit.write_rows([audit.row(priced, PRICES)], "jsonl", handle, audit.COLUMNS)
    [(_, doc)] = list(read_rows(jsonl))
    assert isinstance(doc, dict) and UsageRecord.model_validate(doc) == again
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1"}\n\nnot json\n[1]\n')
    assert [(n, r if isinstance(r, str) else "doc") for n, r in read_rows(bad)] == [
        (1, "doc"),
        (3, "not JSON: Expecting value at column 1"),
        (4, "not a JSON object"),
    ]
    with pytest.raises(ConfigError, match="cannot tell the format"):
        list(read_rows(tmp_path / "usage.txt"))
    with pytest.raises(ConfigError, match="No such file"):
        list(read_rows(tmp_path / "missing.jsonl"))
