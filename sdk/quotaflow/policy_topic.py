"""The policies topic's I/O: reading its versions, publishing one with optimistic concurrency,
and a background follower that hands each newer version to whoever enforces policies (an SDK's
client, a worker). The message contract is :mod:`quotaflow.policy_log`'s."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from quotaflow._exceptions import QuotaflowError
from quotaflow._kafka import consumer as kafka_consumer
from quotaflow._kafka import kafka_errors
from quotaflow._kafka import producer as kafka_producer
from quotaflow.policies import Limits
from quotaflow.policy_log import (
    DOCUMENT_KEY,
    Override,
    PolicyLog,
    PolicyVersion,
    new_version,
    override_key,
    version_key,
)
from quotaflow.settings import QuotaflowSettings

log = logging.getLogger(__name__)


class VersionConflict(QuotaflowError):
    """The live version is not the one the change was made against (someone else applied)."""


def _consume_to_end(
    settings: QuotaflowSettings, on_message: Callable[[Any], None], timeout: float
) -> None:
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    topic = settings.topics.policies
    consumer = kafka_consumer(settings.kafka.confluent_config(), "quotaflow-policies-reader")
    try:
        with kafka_errors("reading the policies topic", settings.kafka.bootstrap_servers):
            meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise QuotaflowError(
                    f"topic {topic} does not exist: create it with `quotaflow topics create`"
                )
            ends = {}
            for p in meta.partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                if high > 0:
                    ends[p] = high
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
            deadline = time.monotonic() + timeout
            while ends and time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None or msg.error() is not None:
                    continue
                on_message(msg)
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
            if ends:
                raise QuotaflowError(f"timed out reading topic {topic}")
    finally:
        consumer.close()


def read_log(settings: QuotaflowSettings, timeout: float = 10.0) -> PolicyLog:
    """Every version the policies topic holds (read to its end)."""
    found = PolicyLog()
    key = signing_key(settings)

    def take(msg: Any) -> None:
        found.add(msg.value(), f"{msg.topic()}[{msg.partition()}]@{msg.offset()}", key)

    _consume_to_end(settings, take, timeout)
    return found


def publish(
    settings: QuotaflowSettings,
    document: dict[str, Any],
    *,
    author: str,
    message: str,
    expect_version: int | None,
    timeout: float = 10.0,
) -> PolicyVersion:
    """Publish ``document`` as the next version, if the live version is still
    ``expect_version`` (None: whatever is live now); returns the version written.

    Kafka has no compare-and-set: the check is made before writing and again after, when the
    topic says whose message won the version number (the first written). A writer that lost
    the race is told so and its message changes nothing."""
    live = read_log(settings, timeout).current
    live_number = live.version if live is not None else 0
    if expect_version is not None and expect_version != live_number:
        raise VersionConflict(
            f"the live policy version is {live_number}, not {expect_version}: "
            "review the new diff (quotaflow policies apply --dry-run) and apply again"
        )
    producer = policy_producer(settings)
    with kafka_errors("connecting to publish policies", settings.kafka.bootstrap_servers):
        producer.list_topics(settings.topics.policies, timeout=timeout)  # connected: the
        # version's time is when it is written, not when the producer started
    ours = new_version(document, live_number + 1, author, message, time.time())
    value = ours.to_json(signing_key(settings))
    errors: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    topic = settings.topics.policies
    for key in (version_key(ours.version), DOCUMENT_KEY):
        producer.produce(topic, key=key, value=value, partition=0, on_delivery=delivered)
    if producer.flush(timeout) or errors:
        raise QuotaflowError(f"publishing policy version {ours.version} failed: {errors}")
    winner = read_log(settings, timeout).versions.get(ours.version)
    if winner is None or winner.hash != ours.hash or winner.time != ours.time:
        raise VersionConflict(
            f"another writer published version {ours.version} first; nothing changed: "
            "review the new diff and apply again"
        )
    return ours


def publish_override(settings: QuotaflowSettings, override: Override) -> None:
    """Write one override message (set or cleared) and wait for the broker to have it."""
    producer = policy_producer(settings)
    errors: list[str] = []
    producer.produce(
        settings.topics.policies, key=override_key(override.key, override.model),
        value=override.to_json(signing_key(settings)), partition=0,
        on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
    )  # fmt: skip
    if producer.flush(10) or errors:
        raise QuotaflowError(f"publishing the override failed: {errors or 'timed out'}")


def policy_producer(settings: QuotaflowSettings) -> Any:
    """A producer for the policies topic. Not idempotent: an idempotent producer's first send
    waits for a producer id (~0.5 s on the embedded broker, measured), which a one-off writer
    pays on every apply; a message written twice by a retry is the same message, which readers
    take once."""
    return kafka_producer(settings.kafka.confluent_config(), enable_idempotence=False)


def signing_key(settings: QuotaflowSettings) -> str | None:
    key = settings.policies.signing_key
    return key.get_secret_value() if key is not None else None


#: How long a follower's fetch waits for a policy message. The embedded broker answers a
#: fetch only when its wait ends, so every follower costs it 1000 / this fetches a second;
#: policies change rarely and must be in force within a second, not within 50 ms.
POLICY_FETCH_WAIT_MS = 200

#: What a follower hands over: the version in force (None: none published, the file rules)
#: and the overrides in force, by (key, model).
OnChange = Callable[[PolicyVersion | None, dict[tuple[str, str | None], Limits]], None]


class PolicyFollower:
    """Background thread following the policies topic: ``on_change`` gets the version in force
    and the active overrides whenever either changes (a newer version, an override set or
    cleared, an override expiring), first once the topic has been read to its end."""

    def __init__(
        self,
        settings: QuotaflowSettings,
        on_change: OnChange,
        *,
        fetch_max_wait_ms: int = POLICY_FETCH_WAIT_MS,
    ) -> None:
        self.settings = settings
        self.on_change = on_change
        self.log = PolicyLog()
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._stop = threading.Event()
        #: Set once the topic has been read to the end it had at start-up.
        self.caught_up = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def version(self) -> int | None:
        current = self.log.current
        return current.version if current is not None else None

    def start(self) -> PolicyFollower:
        self._thread = threading.Thread(target=self._run, name="quotaflow-policies", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        topic = self.settings.topics.policies
        key = signing_key(self.settings)
        consumer = kafka_consumer(
            self.settings.kafka.confluent_config(), "quotaflow-policies-follower",
            fetch_wait_max_ms=self._fetch_max_wait_ms, fetch_min_bytes=1,
        )  # fmt: skip
        delivered: tuple[Any, ...] = (None, {})
        if self._warm_start(key):  # the workers' copy, in force until the topic says more
            delivered = (self.log.current, {})
            self._deliver(*delivered)
        try:
            ends = self._assign(consumer, topic, OFFSET_BEGINNING, TopicPartition)
            if ends is None:
                return
            while not self._stop.is_set():
                msg = consumer.poll(0.2)
                if msg is not None and msg.error() is None:
                    refused = len(self.log.refused)
                    self.log.add(msg.value(), f"{topic}[{msg.partition()}]@{msg.offset()}", key)
                    if len(self.log.refused) > refused:
                        log.warning("policies: refused %s", self.log.refused[-1])
                    if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                        ends.pop(msg.partition(), None)
                if ends:
                    continue  # at start-up, only what the whole backlog leaves in force counts
                # overrides also change on their own, when they expire: compared every poll
                now = (self.log.current, self.log.active_overrides(time.time()))
                if now[0] is not delivered[0] or now[1] != delivered[1]:
                    self._deliver(*now)
                    delivered = now
                if not self.caught_up.is_set() and now[0] is None:
                    log.info("policies: no live version on %s; the policy file %s rules",
                             topic, self.settings.policies_file)  # fmt: skip
                self.caught_up.set()
        except Exception:  # never take the host process down: what is in force stays
            log.exception("policies follower stopped; the policies in force stay in force")
        finally:
            consumer.close()

    def _warm_start(self, key: str | None) -> bool:
        """Take the version the workers copied to Redis; False if there is none to believe
        (no copy, Redis away, or a copy that fails the same checks as a topic message)."""
        import redis

        r = self.settings.redis
        try:
            client = redis.Redis.from_url(r.url, **r.client_kwargs())
            try:
                raw: Any = client.get(r.policies_key)
            finally:
                client.close()
        except Exception as exc:  # redis errors and connection errors alike
            log.info("policies: no Redis copy of the live version (%s)", exc)
            return False
        if raw is None:
            return False
        taken = self.log.add(raw, f"redis {r.policies_key}", key)
        if not taken:
            log.warning("policies: refused the Redis copy: %s", self.log.refused[-1])
        return taken

    def _assign(self, consumer: Any, topic: str, beginning: int, tp: Any) -> dict[int, int] | None:
        while not self._stop.is_set():
            try:
                meta = consumer.list_topics(topic, timeout=2.0).topics.get(topic)
                if meta is not None and meta.error is None and meta.partitions:
                    ends = {}
                    for p in meta.partitions:
                        _, high = consumer.get_watermark_offsets(tp(topic, p), timeout=2.0)
                        if high > 0:
                            ends[p] = high
                    consumer.assign([tp(topic, p, beginning) for p in meta.partitions])
                    return ends
            except Exception as exc:
                log.warning("policies: waiting for topic %s: %s", topic, exc)
            self._stop.wait(0.5)
        return None

    def _deliver(
        self, version: PolicyVersion | None, overrides: dict[tuple[str, str | None], Limits]
    ) -> None:
        try:
            self.on_change(version, overrides)
        except Exception:
            log.exception("policies: applying a change failed; keeping what is in force")
