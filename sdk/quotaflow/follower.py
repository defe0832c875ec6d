"""Decisions follower: keeps a :class:`QuotaCache` current from the decisions topic.

Start-up order avoids a gap: read each partition's end offset first, then load the Redis
snapshot, then consume from those offsets. A state published in between is read from the topic;
a state read twice is ignored as not newer. If Redis is unavailable, the follower reads the
compacted topic from the beginning instead, which holds the latest state of every key.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from quotaflow._kafka import consumer as kafka_consumer
from quotaflow.cache import QuotaCache
from quotaflow.state import HEARTBEAT_KEY, QuotaState, read_heartbeat

log = logging.getLogger(__name__)


class DecisionsFollower:
    """Background thread: Redis warm start, then a group-less consumer over every partition."""

    def __init__(
        self,
        cache: QuotaCache,
        kafka_config: dict[str, Any],
        topic: str,
        *,
        redis_url: str | None = None,
        redis_kwargs: dict[str, Any] | None = None,
        states_hash: str = "quotaflow:states",
        warm_start: bool = True,
        fetch_max_wait_ms: int = 50,
    ) -> None:
        self.cache = cache
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self.topic = topic
        self._kafka_config = kafka_config
        self._redis_url = redis_url
        self._redis_kwargs = redis_kwargs or {}
        self._states_hash = states_hash
        self._warm_start = warm_start and redis_url is not None
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.states_applied = 0
        self.warm_started_keys = 0
        self.invalid_states = 0
        self.error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="quotaflow-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        consumer = kafka_consumer(
            self._kafka_config,
            "quotaflow-follower",  # required by librdkafka; it assigns, and commits nothing
            enable_auto_offset_store=False,
            fetch_wait_max_ms=self._fetch_max_wait_ms,
            fetch_min_bytes=1,
        )
        try:
            partitions = self._wait_for_partitions(consumer)
            if partitions is None:
                return
            ends = {}
            for p in partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=5)
                ends[p] = high
            from_snapshot = self._load_snapshot()
            assignment = [
                TopicPartition(self.topic, p, ends[p] if from_snapshot else OFFSET_BEGINNING)
                for p in partitions
            ]
            consumer.assign(assignment)
            self.ready.set()
            last_expire = time.monotonic()
            while not self._stop.is_set():
                # consume() waits for a full batch or its timeout, so block in poll() for the
                # first message (returns at once) and only then drain what else is ready.
                first = consumer.poll(0.1)
                if first is not None:
                    for msg in [first, *consumer.consume(num_messages=1000, timeout=0)]:
                        if msg.error() is None:
                            self._apply(msg.key(), msg.value())
                if time.monotonic() - last_expire > 1.0:
                    self.cache.expire()
                    last_expire = time.monotonic()
        except Exception as exc:  # keep the service alive; fail modes cover a dead follower
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("decisions follower stopped")
        finally:
            consumer.close()

    def _wait_for_partitions(self, consumer: Any) -> list[int] | None:
        while not self._stop.is_set():
            try:
                md = consumer.list_topics(self.topic, timeout=2.0)
                meta = md.topics.get(self.topic)
                if meta is not None and meta.error is None and meta.partitions:
                    return sorted(meta.partitions)
            except Exception as exc:
                log.warning("waiting for topic %s: %s", self.topic, exc)
            self._stop.wait(0.5)
        return None

    def _load_snapshot(self) -> bool:
        """Warm-start the cache from the Redis snapshot; False if it could not be read."""
        if not self._warm_start:
            return False
        import redis

        try:
            client = redis.Redis.from_url(self._redis_url or "", **self._redis_kwargs)
            try:
                for _, raw in client.hscan_iter(self._states_hash, count=1000):
                    try:
                        state = QuotaState.from_json(raw)
                    except (ValueError, KeyError, TypeError):
                        self.invalid_states += 1
                        continue
                    self.cache.apply_state(state, live=False)
                    self.warm_started_keys += 1
            finally:
                client.close()
        except redis.RedisError as exc:
            log.warning("Redis snapshot unavailable (%s); reading the decisions topic instead", exc)
            return False
        return True

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:
            return
        if key is not None and key == HEARTBEAT_KEY.encode():
            self.cache.mark_heard()
            beat = read_heartbeat(value)
            if beat is not None:
                self.cache.note_fleet(beat.worker, beat.instances)
            return
        try:
            state = QuotaState.from_json(value)
        except (ValueError, KeyError, TypeError):
            self.invalid_states += 1
            return
        self.cache.apply_state(state)
        self.states_applied += 1
