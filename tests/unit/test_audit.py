"""Audit and replay logic that needs no broker: times, grouping, comparison, file rows."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from quotaflow._exceptions import ConfigError
from quotaflow.record import UsageRecord
from quotaflow_producers.replay import read_rows
from quotaflow_stream import audit

NOW = 1_763_800_000.0


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
    by_model = audit.totals(records, ("key", "model"), None)
    assert by_model == {("k", "a"): [2, 2, 20, 0], ("k", "b"): [1, 1, 10, 0]}
    hourly = audit.totals(records, ("key",), "hour")
    assert hourly == {
        ("1970-01-01T02:00:00.000Z", "k"): [2, 2, 20, 0],
        ("1970-01-01T03:00:00.000Z", "k"): [1, 1, 10, 0],
    }


def test_compare_lists_every_differing_field_and_missing_keys() -> None:
    recount = {"a": [2, 2, 20, 5], "b": [1, 1, 1, 1]}
    diffs = audit.compare(recount, {"a": [2, 2, 21, 5], "b": None, "c": [1, 0, 0, 0]}, "worker")
    assert [str(d) for d in diffs] == [
        "a: worker prompt_tokens = 21, the topic says 20",
        "b: worker records = missing, the topic says 1",
        "c: worker records = 1, the topic says 0",
    ]
    assert audit.compare(recount, {"a": [2, 2, 20, 5], "b": [1, 1, 1, 1]}, "worker") == []


def test_rows_as_csv_and_jsonl() -> None:
    rows = [audit.row(rec(1, 1.5))]
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
    audit.write_rows([audit.row(rec(1, 1.5)), audit.row(rec(2, 2.5))], "csv", out, audit.COLUMNS)
    path = tmp_path / "trail.csv"
    path.write_text(out.getvalue())
    rows = list(read_rows(path))
    assert [n for n, _ in rows] == [2, 3]
    assert UsageRecord.model_validate(rows[0][1]) == rec(1, 1.5)
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
