"""``quotaflow replay FILE``: import usage logs (JSONL or CSV) into the usage topic.

Each row becomes a usage record with its original ``id`` and ``ts``, keyed by its counter key
(so Kafka's default partitioner routes it as the SDK would). Replaying is idempotent: the worker
counts an id once within its dedup horizon. A row that breaks the record contract is reported
with its line and field and skipped; every valid row is sent. Records older than the grace
period are sent too: they stay in the audit trail and the lifetime totals, count in no expired
window, and are reported here as late.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from quotaflow._exceptions import ConfigError
from quotaflow.record import EXPORT_ONLY_COLUMNS, UsageRecord, describe_validation_error
from quotaflow.settings import QuotaflowSettings
from quotaflow.windows import DAY, MINUTE, bucket_expires_at, bucket_start

_INT_FIELDS = (
    "requests", "prompt_tokens", "completion_tokens", "cached_prompt_tokens",
    "cache_write_tokens", "reasoning_tokens", "images", "cost_micros",
)  # fmt: skip
_BOOL_FIELDS = ("estimated",)


@dataclass
class ReplayReport:
    rows: int = 0
    sent: int = 0
    invalid: list[str] = field(default_factory=list)
    #: Too late for a minute window / for every window (a day plus grace).
    late_minute: int = 0
    late_all_windows: int = 0
    undelivered: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "sent": self.sent,
            "invalid": len(self.invalid),
            "invalid_rows": self.invalid[:50],
            "late_for_minute_windows": self.late_minute,
            "late_for_all_windows": self.late_all_windows,
            "undelivered": self.undelivered,
        }


def read_rows(path: Path, fmt: str | None = None) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """``(line, row)`` for each data row; ``row`` is an error text for unparsable lines."""
    fmt = fmt or {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(
        path.suffix.lower()
    )
    if fmt not in ("jsonl", "csv"):
        raise ConfigError(f"{path}: cannot tell the format; use --format jsonl|csv")
    try:
        # opened apart from the ``with`` below so a missing file is a ConfigError, not a trace
        handle = open(path, encoding="utf-8", newline="")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    with handle:
        if fmt == "jsonl":
            for n, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, f"not JSON: {exc.msg} at column {exc.colno}"
                    continue
                if isinstance(doc, dict):
                    yield n, {k: v for k, v in doc.items() if k not in EXPORT_ONLY_COLUMNS}
                else:
                    yield n, "not a JSON object"
        else:
            reader = csv.DictReader(handle)
            for doc in reader:
                yield reader.line_num, _from_csv(doc)


def _from_csv(doc: dict[str, Any]) -> dict[str, Any]:
    """CSV cells are text: drop empty ones (defaults apply) and the export's own columns."""
    out: dict[str, Any] = {}
    for name, value in doc.items():
        if name is None or value is None or value == "" or name in EXPORT_ONLY_COLUMNS:
            continue
        if name in _BOOL_FIELDS:
            out[name] = value.strip().lower() in ("1", "true", "yes")
        elif name in _INT_FIELDS and value.strip().lstrip("-").isdigit():
            out[name] = int(value)
        elif name == "attrs":
            out[name] = json.loads(value)
        else:
            out[name] = value
    return out


def replay(
    settings: QuotaflowSettings,
    path: Path,
    fmt: str | None = None,
    progress: Callable[[int], None] | None = None,
    now: float | None = None,
) -> ReplayReport:
    """Send every valid row of ``path`` to the usage topic; returns what happened."""
    from quotaflow._kafka import producer as kafka_producer

    report = ReplayReport()
    now = time.time() if now is None else now
    grace = settings.worker.grace_seconds
    producer = kafka_producer(settings.kafka.confluent_config(), linger_ms=20)
    failed: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    for line, doc in read_rows(path, fmt):
        report.rows += 1
        if isinstance(doc, str):
            report.invalid.append(f"{path}:{line}: {doc}")
            continue
        try:
            record = UsageRecord.model_validate(doc)
        except ValidationError as exc:
            report.invalid.append(f"{path}:{line}: {describe_validation_error(exc)}")
            continue
        if bucket_expires_at(bucket_start(record.ts, MINUTE), MINUTE) + grace <= now:
            report.late_minute += 1
            if bucket_expires_at(bucket_start(record.ts, DAY), DAY) + grace <= now:
                report.late_all_windows += 1
        while True:
            try:
                producer.produce(
                    settings.topics.usage, key=record.key.encode(), value=record.to_json(),
                    on_delivery=delivered,
                )  # fmt: skip
                break
            except BufferError:  # the local queue is full: let it drain
                producer.poll(0.1)
        producer.poll(0)
        report.sent += 1
        if progress and report.rows % 500 == 0:
            progress(report.rows)
    remaining = producer.flush(60)
    report.undelivered = remaining + len(failed)
    report.sent -= report.undelivered
    if progress:
        progress(report.rows)
    return report
