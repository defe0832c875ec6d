"""Run one stream worker: create topics, build the app, register the worker's parts, start Faust."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from typing import Any

import faust
import redis.asyncio as aioredis

from quotaflow.policies import load_policies
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.admin_api import register_admin_api
from quotaflow_stream.agents import StreamWorker
from quotaflow_stream.app import build_app
from quotaflow_stream.counters import Counters
from quotaflow_stream.snapshot import SnapshotWriter
from quotaflow_stream.topics import ensure_topics
from quotaflow_stream.web import WebApi

log = logging.getLogger(__name__)

#: Cycle-collector thresholds for the worker process. It holds millions of long-lived objects
#: and allocates a few short-lived ones per record, so Python's default (a young collection
#: every 700 allocations) spent ~25 % of its time collecting (bench stream: 62k -> 78k
#: records/s). Collections still run, for the cycles asyncio and Faust do create.
GC_THRESHOLDS = (50_000, 20, 100)


def create_worker(settings: QuotaflowSettings) -> StreamWorker:
    """Everything a worker runs, registered on its app, ready for ``faust.Worker``. Config
    errors raise here."""
    policies = load_policies(settings.policies_file)
    counts = ensure_topics(settings)
    app = build_app(settings)
    redis_client = aioredis.Redis.from_url(settings.redis.url, **settings.redis.client_kwargs())
    snapshot = SnapshotWriter(redis_client, settings.redis.states_hash, settings.redis.policies_key)
    stream = StreamWorker(
        app, settings, policies, snapshot, usage_partitions=counts[settings.topics.usage]
    ).register()
    WebApi(stream)
    register_admin_api(stream)
    return stream


def run_worker(settings: QuotaflowSettings, loglevel: str = "info") -> None:
    """Block running a worker until SIGINT/SIGTERM; exits 1 if it stopped without saving."""
    gc.set_threshold(*GC_THRESHOLDS)
    stream = create_worker(settings)
    time_collections(stream.counters)
    settings.worker.data_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "quotaflow worker %s: usage=%s decisions=%s web=http://%s:%d",
        settings.worker.app_id,
        settings.topics.usage,
        settings.topics.decisions,
        settings.worker.web_host,
        settings.worker.web_port,
    )
    worker = PipelineWorker(stream, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as done:
        if worker.unsaved is not None and not done.code:
            raise SystemExit(EXIT_UNSAVED) from None
        raise


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


#: Exit status of a worker that stopped without saving everything it had folded.
EXIT_UNSAVED = 3


class PipelineWorker(faust.Worker):
    """Faust's worker, saving the pipeline's aggregates before it stops (Faust then waits for
    every folded message to be acked, and the pipeline acks only what it has saved) and
    flushing the Redis snapshot after.

    The stop is bounded: a broker that is away would make the final save, and Faust's wait for
    acks, last forever. Past ``worker.stop_timeout`` the save gives up: the worker logs what it
    did not save, lets Faust stop without those acks, and exits with :data:`EXIT_UNSAVED`; a
    watchdog ends the process if Faust's own stop still hangs. Nothing is lost: unsaved
    messages were never committed, so their partitions' next owner reads them again, and
    their record ids make them count once."""

    def __init__(self, stream: StreamWorker, **kwargs: Any) -> None:
        super().__init__(stream.app, **kwargs)
        self.stream = stream
        #: (entries, messages) left unsaved at the stop, or None if everything was saved.
        self.unsaved: tuple[int, int] | None = None
        self._watchdog: threading.Thread | None = None

    async def stop(self) -> None:
        pipeline, timeout = self.stream.pipeline, self.stream.settings.worker.stop_timeout
        self._start_watchdog(3 * timeout)
        pipeline.closing = True
        try:
            saved = await asyncio.wait_for(pipeline.save(), timeout)
        except Exception:  # a timeout, or anything else: stopping goes on
            saved = False
        if not saved:
            entries = self.stream.store.stats()["unsaved_entries"]
            self.unsaved = (entries, pipeline.unacked_messages)
            log.error(
                "stopping without the final save (%d entries, %d usage messages unsaved after "
                "%gs; is the broker at %s reachable?): their offsets are not committed, so the "
                "next owner of their partitions reads them again and counts them once",
                entries, pipeline.unacked_messages, timeout,
                self.stream.settings.kafka.bootstrap_servers,
            )  # fmt: skip
            # Faust would wait for acks that will never come
            self.stream.app.conf.stream_wait_empty = False
        await super().stop()
        try:  # the states published since the last snapshot flush, so Redis ends current
            await asyncio.wait_for(self.stream.snapshot.flush(), timeout)
        except Exception:
            log.warning("final snapshot flush failed", exc_info=True)

    def _start_watchdog(self, seconds: float) -> None:
        if self._watchdog is not None:
            return

        def watch() -> None:
            time.sleep(seconds)
            log.error("the worker did not stop within %gs; exiting", seconds)
            logging.shutdown()
            os._exit(EXIT_UNSAVED)

        self._watchdog = threading.Thread(target=watch, name="stop-watchdog", daemon=True)
        self._watchdog.start()
