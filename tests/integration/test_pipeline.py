"""The worker against the real broker and Redis: aggregation, DLQ, routing, snapshot, recovery."""

from __future__ import annotations

import json
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from quotaflow import QuotaClient
from quotaflow.partitioner import partition_for
from quotaflow.settings import QuotaflowSettings
from quotaflow.state import QuotaState
from quotaflow_stream.harness import DevStack, WorkerProcess
from tests.support import pipeline_settings, running_worker, wait_for

pytestmark = pytest.mark.integration


def record_doc(i: int, key: str, **over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "id": f"raw-{key}-{i}",
        "ts": time.time(),
        "key": key,
        "model": "gpt-4o-mini",
        "prompt_tokens": 10,
        "completion_tokens": 1,
        "source": "raw-producer",
    }
    doc.update(over)
    return doc


def producer(settings: QuotaflowSettings) -> Producer:
    return Producer({**settings.kafka.confluent_config(), "partitioner": "murmur2_random"})


def snapshot_state(settings: QuotaflowSettings, key: str) -> QuotaState | None:
    client = redis.Redis.from_url(settings.redis.url)
    try:
        raw = client.hget(settings.redis.states_hash, key)
    finally:
        client.close()
    return QuotaState.from_json(raw) if raw else None


def test_sdk_usage_is_aggregated_exactly_and_snapshotted(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    keys = [f"acct-{i}" for i in range(5)]
    sent = {k: [0, 0, 0] for k in keys}
    with QuotaClient(settings) as client:
        assert client.wait_ready(30)
        for i in range(60):
            key = keys[i % 5]
            client.record(key, "gpt-4o-mini", prompt_tokens=i, completion_tokens=2 * i)
            sent[key][0] += 1
            sent[key][1] += i
            sent[key][2] += 2 * i

        def all_counted() -> bool:
            for key, (n, pt, ct) in sent.items():
                st = client.cache.state(key)
                if st is None or (st.totals.records, st.totals.prompt_tokens) != (n, pt):
                    return False
                assert st.totals.completion_tokens == ct
            return True

        wait_for(all_counted, what="the stream to count every record")
    for key, (n, pt, _) in sent.items():
        snap = wait_for(lambda key=key: snapshot_state(settings, key), what="Redis snapshot")
        assert (snap.totals.records, snap.totals.prompt_tokens) == (n, pt)
        assert snap.scope_policies[""] == "default"


def test_malformed_messages_go_to_the_dlq_and_valid_ones_survive(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    p = producer(settings)
    usage = settings.topics.usage
    key = "dlq-mixed"
    good = [record_doc(1, key), record_doc(2, key)]
    bad_in_array = record_doc(3, key, prompt_tokens=-7)
    p.produce(usage, key=key.encode(), value=json.dumps([good[0], bad_in_array, good[1]]))
    p.produce(usage, key=b"\xff\xfe-not-utf8", value=b"\x00\x01 random bytes")
    p.produce(usage, key=key.encode(), value=json.dumps({"id": "x", "ts": "yesterday"}))
    p.produce(usage, key=key.encode(), value=json.dumps(record_doc(4, key, ts=time.time() + 86400)))
    p.produce(usage, key=key.encode(), value=b'{"truncated": ')
    secret = "sk-live-" + "s" * 32
    p.produce(usage, key=key.encode(), value=json.dumps(record_doc(5, secret, id="leaky")))
    assert p.flush(10) == 0

    consumer = Consumer(
        {**settings.kafka.confluent_config(), "group.id": "dlq-reader", "enable.auto.commit": False}
    )
    consumer.assign(
        [TopicPartition(settings.topics.dlq, p_, 0) for p_ in range(settings.topics.partitions)]
    )
    dead: list[tuple[bytes | None, str, bytes]] = []

    def six_dead() -> bool:
        for msg in consumer.consume(100, timeout=0.2):
            if msg.error() is None:
                reason = dict(msg.headers() or [])["quotaflow-dlq-reason"].decode()
                dead.append((msg.key(), reason, msg.value()))
        return len(dead) >= 6

    wait_for(six_dead, what="six dead letters")
    consumer.close()
    reasons = sorted(r for _, r, _ in dead)
    assert any(r.startswith("[1].prompt_tokens:") for r in reasons), reasons
    assert any("not JSON" in r for r in reasons), reasons
    assert any("ts:" in r and "ahead of the worker clock" in r for r in reasons), reasons
    assert any("ts: Input should be a valid number" in r for r in reasons), reasons
    assert (b"\xff\xfe-not-utf8") in [k for k, _, _ in dead], "original key is kept"
    assert any("raw API secret" in r for r in reasons), reasons
    assert all(secret.encode() not in v for _, _, v in dead), "a leaked secret is redacted"
    bad_value = next(v for _, r, v in dead if r.startswith("[1]."))
    assert json.loads(bad_value)["id"] == bad_in_array["id"]

    with QuotaClient(settings) as client:
        st = wait_for(lambda: client.cache.state(key), what="state of the valid records")
        assert st.totals.records == 2
    stats = worker.stats()
    assert stats is not None and stats["dlq"] >= 6
    assert worker.proc is not None and worker.proc.poll() is None, "worker kept running"


def test_misrouted_records_are_forwarded_and_counted_once(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    key = "wrongly-routed"
    parts = settings.topics.partitions
    home = partition_for(key.encode(), parts)
    wrong = (home + 1) % parts
    p = producer(settings)
    p.produce(settings.topics.usage, key=key.encode(), value=json.dumps(record_doc(1, key)),
              partition=wrong)  # fmt: skip
    assert p.flush(10) == 0
    with QuotaClient(settings) as client:
        st = wait_for(lambda: client.cache.state(key), what="forwarded record's state")
        assert st.totals.records == 1
        time.sleep(1.0)  # a double count would show up within a refresh
        assert client.cache.state(key).totals.records == 1  # type: ignore[union-attr]
    assert (worker.stats() or {})["forwarded"] >= 1


def test_librdkafka_murmur2_partitioner_agrees_with_ours(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    p = producer(settings)
    seen: dict[str, int] = {}

    def on_delivery(err: object, msg: object) -> None:
        assert err is None
        seen[msg.key().decode()] = msg.partition()  # type: ignore[attr-defined]

    for i in range(200):
        p.produce(
            settings.topics.dlq, key=f"route-{i}".encode(), value=b"x", on_delivery=on_delivery
        )
    assert p.flush(10) == 0
    parts = settings.topics.partitions
    assert {k: partition_for(k.encode(), parts) for k in seen} == seen


def test_a_new_client_warm_starts_from_the_snapshot(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    with QuotaClient(settings) as first:
        first.wait_ready(30)
        first.record("warm-key", "gpt-4o-mini", prompt_tokens=5)
    wait_for(lambda: snapshot_state(settings, "warm-key"), what="snapshot of warm-key")
    with QuotaClient(settings) as fresh:
        assert fresh.wait_ready(30)
        assert fresh.stats()["warm_started_keys"] >= 1
        assert fresh.cache.state("warm-key") is not None


def test_without_redis_a_client_reads_the_compacted_topic(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    with QuotaClient(settings) as first:
        first.wait_ready(30)
        first.record("topic-key", "gpt-4o-mini", prompt_tokens=5)
        wait_for(lambda: first.cache.state("topic-key"), what="state of topic-key")
    no_redis = settings.model_copy(deep=True)
    no_redis.redis.url = "redis://127.0.0.1:1/0"  # nothing listens there
    with QuotaClient(no_redis) as fresh:
        assert fresh.wait_ready(30)
        assert fresh.stats()["warm_started_keys"] == 0
        st = wait_for(lambda: fresh.cache.state("topic-key"), what="state read from the topic")
        assert st.totals.records == 1


def test_restarted_worker_recovers_its_table(
    settings: QuotaflowSettings, worker: WorkerProcess, tmp_path: Path
) -> None:
    with QuotaClient(settings) as client:
        client.wait_ready(30)
        first = [client.record("durable", "gpt-4o-mini", prompt_tokens=7) for _ in range(3)]
        wait_for(
            lambda: (s := client.cache.state("durable")) and s.totals.records == 3,
            what="three records counted",
        )
    assert worker.stop() == 0, worker.log_tail()
    worker.start().wait_ready(90)
    # a redelivery of an already counted record (same id) after the restart counts nothing:
    # the ids seen are recovered with the counts
    again = record_doc(0, "durable", id=first[1].id, ts=first[1].ts, prompt_tokens=7)
    p = producer(settings)
    p.produce(settings.topics.usage, key=b"durable", value=json.dumps(again).encode())
    assert p.flush(10) == 0
    with QuotaClient(settings) as client:
        client.wait_ready(30)
        client.record("durable", "gpt-4o-mini", prompt_tokens=7)
        st = wait_for(
            lambda: (s := client.cache.state("durable")) and s.totals.records >= 4 and s,
            what="the fourth record on top of the recovered three",
        )
        time.sleep(0.5)  # the duplicate went first; give a wrong count time to show
        st = client.cache.state("durable")
        assert st is not None
        assert st.totals.records == 4 and st.totals.prompt_tokens == 28
    assert (worker.stats() or {}).get("duplicates") == 1


def test_sigterm_saves_acks_and_flushes_what_no_timer_had_yet(
    stack: DevStack, tmp_path: Path
) -> None:
    """With saves and snapshot flushes an hour apart, only the graceful stop can write them:
    the worker exits 0, Redis holds the final state, and a restarted worker recovers the counts
    from the changelog without reading the messages again (their offsets were committed) and
    publishes the recovered key's state."""
    settings = pipeline_settings(stack, tmp_path)
    settings.worker.save_interval = 3600
    settings.worker.snapshot_interval = 3600
    with contextmanager(running_worker)(settings) as worker:
        with QuotaClient(settings) as client:
            client.wait_ready(30)
            for _ in range(5):
                client.record("graceful", "gpt-4o-mini", prompt_tokens=3)
            wait_for(lambda: (s := client.cache.state("graceful")) and s.totals.records == 5,
                     what="five records counted")  # fmt: skip
        assert snapshot_state(settings, "graceful") is None, "no flush before the stop"
        assert (worker.stats() or {}).get("unacked_messages", 0) > 0, "nothing saved yet"
        assert worker.stop() == 0, worker.log_tail()
        final = snapshot_state(settings, "graceful")
        assert final is not None and final.totals.records == 5
        worker.start().wait_ready(90)
        # the restarted worker holds the counts (its table recovered from the changelog) and
        # publishes the recovered key's state once, with no record of its own
        url = f"{worker.base_url}/api/keys/graceful"
        request = urllib.request.Request(url, headers=settings.worker.api_headers())
        with urllib.request.urlopen(request, timeout=5) as resp:
            state = QuotaState.from_json(resp.read())
        assert state.totals.records == 5 and state.totals.prompt_tokens == 15
        wait_for(lambda: (worker.stats() or {}).get("states_published", 0) >= 1,
                 what="the recovered key's state published again")  # fmt: skip
        time.sleep(1.0)  # a redelivery would show up as records counted by this worker
        assert (worker.stats() or {}).get("records") == 0, "offsets were committed at the stop"


def test_quiet_keys_leave_the_workers_memory_of_published_states(
    stack: DevStack, tmp_path: Path
) -> None:
    """A key with no usage for ``active_horizon`` stops being refreshed and its last state is
    dropped from the worker's map (the snapshot keeps it), so that map stays the keys in use."""
    settings = pipeline_settings(stack, tmp_path)
    settings.worker.active_horizon = 1.0
    with contextmanager(running_worker)(settings) as worker:
        with QuotaClient(settings) as client:
            client.wait_ready(30)
            client.record("briefly", "gpt-4o-mini", prompt_tokens=3)
        wait_for(lambda: (worker.stats() or {}).get("published_keys") == 1,
                 what="the key's state published")  # fmt: skip
        wait_for(lambda: (st := worker.stats() or {}).get("published_keys") == 0
                 and st.get("active_keys") == 0, what="the quiet key forgotten")  # fmt: skip
        state = wait_for(lambda: snapshot_state(settings, "briefly"), what="the snapshot")
        assert state.totals.records == 1, "the snapshot keeps the last state"


def test_a_fuzzed_usage_topic_never_stops_the_worker(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    """Generated garbage (random bytes, wrong types, negative, huge and NaN numbers, junk
    nesting, keys that are not UTF-8) beside valid records: the worker keeps running, every
    rejection reaches the DLQ and every valid record counts. Each case is labelled valid or
    invalid by the generator itself, from the record contract, never by the worker's decoder."""
    import random

    rng = random.Random(20261122)
    now = time.time()
    # (field, value) changes that break the v1 contract, each for a reason of its own...
    invalid = [
        ("prompt_tokens", -1), ("prompt_tokens", 10**30), ("completion_tokens", "12x"),
        ("requests", 3.5), ("requests", 10**7), ("ts", None), ("ts", -1.0), ("ts", "NaN"),
        ("ts", now + 10**6), ("key", ""), ("key", "k" * 300), ("key", "sk-live-abc"),
        ("model", []), ("model", "m" * 200), ("id", {}), ("source", None),
        ("status", "maybe"), ("estimated", "perhaps"), ("unknown", 1),
        ("attrs", {"nested": {"deep": [1]}}), ("attrs", {str(n): "v" for n in range(17)}),
    ]  # fmt: skip
    # ...and changes that keep it valid
    valid = [("attrs", {}), ("attrs", {"team": "a"}), ("estimated", True), ("status", "error"),
             ("requests", 0), ("prompt_tokens", 10**9), ("completion_tokens", 0)]  # fmt: skip
    not_json_start = [b for b in range(256) if chr(b) not in '[{"-0123456789tfn \t\r\n']
    before = (worker.stats() or {}).get("dlq", 0)
    p = producer(settings)
    expected_dead = expected_counted = 0

    def mutated(doc: dict[str, object]) -> bool:
        """Apply a labelled change to ``doc``; True if it stays a valid record."""
        field, value = rng.choice(invalid + valid)
        doc[field] = value
        return (field, value) in valid

    # every labelled change once for sure (alone in a message, or beside a valid record), then
    # random mixes of them
    for n, (field, value) in enumerate(invalid + valid):
        docs = [record_doc(20_000 + n * 2, "fuzz-other"), record_doc(20_001 + n * 2, "fuzz-other")]
        docs[1][field] = value
        ok = (field, value) in valid
        p.produce(settings.topics.usage, key=b"fz", value=json.dumps(docs[n % 2 :]).encode())
        expected_counted += ok + (n % 2 == 0)
        expected_dead += not ok
    for i in range(150):
        kind = rng.random()
        if kind < 0.25:  # bytes that cannot begin any JSON value
            head = bytes([rng.choice(not_json_start)])
            value = head + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            expected_dead += 1
        elif kind < 0.5:  # one record, changed
            one = record_doc(i, "fuzz-other")
            ok = mutated(one)
            value = json.dumps(one).encode()
            expected_counted += ok
            expected_dead += not ok
        elif kind < 0.75:  # three records, one of them changed
            docs = [record_doc(10_000 + i * 10 + j, "fuzz-other") for j in range(3)]
            ok = mutated(docs[rng.randrange(3)])
            value = json.dumps(docs).encode()
            expected_counted += 2 + ok
            expected_dead += not ok
        else:  # JSON that is no record at all: each one dead letter
            junk = [None, -1, 10**30, 1e308, "x" * 300, [], {}, [[[]]], True, {"n": [1]}, 3.5]
            value = json.dumps(rng.choice(junk)).encode()
            expected_dead += 1
        key = bytes(rng.randrange(128, 256) for _ in range(4)) if rng.random() < 0.3 else b"fz"
        p.produce(settings.topics.usage, key=key, value=value)
    for i in range(20):
        p.produce(settings.topics.usage, key=b"fuzz-valid",
                  value=json.dumps(record_doc(i, "fuzz-valid")).encode())  # fmt: skip
    assert p.flush(10) == 0
    assert expected_dead > 50 and expected_counted > 50
    wait_for(
        lambda: (worker.stats() or {}).get("dlq", 0) - before >= expected_dead,
        what=f"{expected_dead} dead letters",
    )
    with QuotaClient(settings) as client:
        st = wait_for(
            lambda: (s := client.cache.state("fuzz-valid")) and s.totals.records == 20 and s,
            what="the valid records",
        )
        assert st.totals.records == 20

        def counted_others() -> int:
            state = client.cache.state("fuzz-other")
            return state.totals.records if state is not None else 0

        wait_for(lambda: counted_others() >= expected_counted,
                 what=f"the {expected_counted} valid records beside the garbage")  # fmt: skip
        assert counted_others() == expected_counted
    assert (worker.stats() or {}).get("dlq", 0) - before == expected_dead
    assert worker.proc is not None and worker.proc.poll() is None, "worker kept running"
