"""Run one stream worker: create topics, build the app, attach the pipeline, start Faust."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import faust
import redis.asyncio as aioredis

from quotaflow.policies import load_policies
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.agents import Counters, UsagePipeline
from quotaflow_stream.app import build_app
from quotaflow_stream.snapshot import SnapshotWriter
from quotaflow_stream.topics import ensure_topics
from quotaflow_stream.web import WebApi

log = logging.getLogger(__name__)

#: Cycle-collector thresholds for the worker process. It holds millions of long-lived objects
#: and allocates a few short-lived ones per record, so Python's default (a young collection
#: every 700 allocations) spent ~25 % of its time collecting (bench stream: 62k -> 78k
#: records/s). Collections still run, for the cycles asyncio and Faust do create.
GC_THRESHOLDS = (50_000, 20, 100)


def create_pipeline(settings: QuotaflowSettings) -> UsagePipeline:
    """Everything a worker runs, ready for ``faust.Worker``. Config errors raise here."""
    policies = load_policies(settings.policies_file)
    counts = ensure_topics(settings)
    app = build_app(settings)
    redis_client = aioredis.Redis.from_url(settings.redis.url, **settings.redis.client_kwargs())
    snapshot = SnapshotWriter(redis_client, settings.redis.states_hash)
    pipeline = UsagePipeline(
        app, settings, policies, snapshot, usage_partitions=counts[settings.topics.usage]
    )
    WebApi(pipeline)
    return pipeline


def run_worker(settings: QuotaflowSettings, loglevel: str = "info") -> None:
    """Block running a worker until SIGINT/SIGTERM."""
    gc.set_threshold(*GC_THRESHOLDS)
    pipeline = create_pipeline(settings)
    time_collections(pipeline.counters)
    settings.worker.data_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "quotaflow worker %s: usage=%s decisions=%s web=http://%s:%d",
        settings.worker.app_id,
        settings.topics.usage,
        settings.topics.decisions,
        settings.worker.web_host,
        settings.worker.web_port,
    )
    worker = PipelineWorker(pipeline, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()


def time_collections(counters: Counters) -> None:
    """Add the time the cycle collector runs to ``counters.seconds_collecting`` (it runs
    inside whatever allocated, so this overlaps the other time shares)."""
    started = 0.0

    def on_collection(phase: str, info: dict[str, Any]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            counters.seconds_collecting += time.perf_counter() - started

    gc.callbacks.append(on_collection)


class PipelineWorker(faust.Worker):
    """Faust's worker, saving the pipeline's aggregates before it stops (Faust then waits for
    every folded message to be acked, and the pipeline acks only what it has saved) and
    flushing the Redis snapshot after."""

    def __init__(self, pipeline: UsagePipeline, **kwargs: Any) -> None:
        super().__init__(pipeline.app, **kwargs)
        self.pipeline = pipeline

    async def stop(self) -> None:
        self.pipeline.closing = True
        try:
            await self.pipeline.save()
        except Exception:  # stopping goes on; unsaved messages are redelivered, counted once
            log.exception("final save failed")
        await super().stop()
        try:  # the states published since the last snapshot flush, so Redis ends current
            await self.pipeline.snapshot.flush()
        except Exception:
            log.warning("final snapshot flush failed", exc_info=True)
