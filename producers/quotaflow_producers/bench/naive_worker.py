"""The naive worker ``quotaflow bench stream`` measures against: how Faust is usually written.

One record per message, parsed and validated on its own (json + the pydantic model), and one
table update per record (``table[key] = ...``, so one changelog message per record through
Faust's producer). It counts per key what the real worker counts in its totals, so the bench can
check both against the records it sent.

Run as ``python -m quotaflow_producers.bench.naive_worker STATS_FILE EXPECTED`` with the worker's
settings in the environment (``QUOTAFLOW_*``); it writes its progress to ``STATS_FILE`` (JSON)
twice a second, and the per-key totals once it has counted ``EXPECTED`` records.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faust

from quotaflow.record import UsageRecord
from quotaflow.settings import load_settings
from quotaflow_stream.app import broker_url


def build(stats_path: Path, expected: int) -> faust.App:
    settings = load_settings()
    app = faust.App(
        f"{settings.worker.app_id}-naive",
        broker=broker_url(settings),
        broker_session_timeout=6,
        store="memory://",
        datadir=str(settings.worker.data_dir / "naive"),
        topic_partitions=settings.topics.partitions,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_linger_ms=5,
    )
    usage = app.topic(
        settings.topics.usage,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    totals = app.Table("naive-totals", default=None)
    progress: dict[str, Any] = {"records": 0, "first_record_at": None, "last_record_at": None}

    @app.agent(usage)
    async def count(stream: Any) -> None:
        async for value in stream:
            record = UsageRecord.model_validate_json(value)
            if progress["first_record_at"] is None:
                progress["first_record_at"] = time.time()
            sums = totals.get(record.key) or [0, 0, 0]
            totals[record.key] = [
                sums[0] + record.requests,
                sums[1] + record.prompt_tokens,
                sums[2] + record.completion_tokens,
            ]
            progress["records"] += 1
            progress["last_record_at"] = time.time()

    @app.timer(0.5)
    async def report() -> None:
        out = dict(progress)
        if progress["records"] >= expected:
            out["totals"] = {key: list(sums) for key, sums in totals.items()}
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, stats_path)

    return app


def main() -> None:
    stats_path, expected = Path(sys.argv[1]), int(sys.argv[2])
    app = build(stats_path, expected)
    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
