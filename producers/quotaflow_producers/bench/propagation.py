"""``quotaflow bench propagation``: how long a call's usage takes to reach the whole fleet, in
its two stages, against the broker's own floor measured in the same run.

One instance records a call at random moments (50-150 ms apart, so no stage can fall into step
with the recording loop) on a few keys; a worker folds it and publishes the key's state;
``--followers`` other instances follow the decisions topic. Per call: record produced → the
worker publishing a state that counts it (the state's ``published_at``), → the last follower
holding that state. The floor is what the broker alone costs on the same path: a bare message
produced and consumed with the worker's fetch wait (the usage hop), and again with the
followers' (the decisions hop). The fleet is quiet here: ``quotaflow simulate`` measures
propagation under load.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from quotaflow.stats import percentile
from quotaflow_producers.bench.common import bench_run, progress

#: Keys the recording instance spreads its calls over.
KEYS = 8
#: Longest wait for a call's state to reach every follower before it counts as not seen.
SEEN_WITHIN = 5.0


def _summary(values: list[float]) -> dict[str, Any]:
    p99 = percentile(values, 99)
    return {
        "count": len(values),
        "p50_ms": round(statistics.median(values), 1) if values else None,
        "p99_ms": None if p99 is None else round(p99, 1),
    }


def _gap(rng: random.Random) -> None:
    time.sleep(rng.uniform(0.05, 0.15))


def broker_hop_ms(conf: dict[str, Any], topic: str, fetch_wait_ms: int, count: int,
                  rng: random.Random) -> list[float]:  # fmt: skip
    """Produced → consumed (ms) of ``count`` bare messages on ``topic`` with a consumer
    fetching as the pipeline's do (``fetch_wait_ms``), a message at a time at random moments."""
    from quotaflow._kafka import consumer, producer

    out: list[float] = []
    prod = producer(conf, linger_ms=0)
    cons = consumer(conf, f"{topic}-hop-{fetch_wait_ms}", fetch_wait_max_ms=fetch_wait_ms,
                    auto_offset_reset="latest", session_timeout_ms=6000)  # fmt: skip
    try:
        cons.subscribe([topic])
        deadline = time.monotonic() + 60
        while not cons.assignment() and time.monotonic() < deadline:
            cons.poll(0.1)
        warm = False  # until the consumer's position is set, a message could pass it by
        while not warm and time.monotonic() < deadline:
            prod.produce(topic, b"warm-up")
            prod.flush(10)
            started = time.monotonic()
            while not warm and time.monotonic() - started < 1:
                msg = cons.poll(0.1)
                warm = msg is not None and not msg.error() and msg.value() == b"warm-up"
        for i in range(count):
            sent = time.perf_counter()
            prod.produce(topic, str(i).encode())
            prod.poll(0)
            while time.perf_counter() - sent < SEEN_WITHIN:
                msg = cons.poll(0.05)
                if msg is not None and not msg.error() and msg.value() == str(i).encode():
                    out.append((time.perf_counter() - sent) * 1000)
                    break
            _gap(rng)
    finally:
        cons.close()
        prod.flush(5)
    return out


def run_propagation(args: argparse.Namespace) -> int:
    if args.calls < 1 or args.followers < 1:
        raise SystemExit("quotaflow bench propagation: --calls and --followers must be >= 1")
    with bench_run("bench-propagation") as (_, settings, run_dir):
        return _measure(args, settings, run_dir)


def _measure(args: argparse.Namespace, settings: Any, run_dir: Any) -> int:
    from confluent_kafka.admin import NewTopic

    from quotaflow._kafka import admin
    from quotaflow.client import QuotaClient
    from quotaflow_stream.harness.launcher import WorkerProcess
    from quotaflow_stream.topics import ensure_topics

    say = progress(args.json)
    rng = random.Random(args.seed)
    settings.client.journal = False
    ensure_topics(settings)
    say("starting the worker...")
    worker = WorkerProcess(settings, run_dir / "worker.log").start()
    clients: list[QuotaClient] = []
    try:
        worker.wait_ready(120)

        def instance(name: str, follow: bool) -> QuotaClient:
            own = settings.model_copy(deep=True)
            own.client.source = name
            client = QuotaClient(own, follow=follow).open()
            clients.append(client)
            return client

        recorder = instance("bench-recorder", follow=False)
        followers = [instance(f"bench-follower-{i}", follow=True) for i in range(args.followers)]
        for i in range(KEYS):  # every key's first state, so the followers know them
            recorder.record(f"prop-{i}", "gpt-4o", prompt_tokens=1)
        time.sleep(2)

        say(f"recording {args.calls} calls, {args.followers} followers...")
        to_publish: list[float] = []
        to_apply: list[float] = []
        total: list[float] = []
        unseen = 0
        for i in range(args.calls):
            key = f"prop-{i % KEYS}"
            ts = recorder.record(key, "gpt-4o", prompt_tokens=100).ts
            applied: list[float] = []
            published = 0.0
            waiting = list(followers)
            while waiting and time.time() - ts < SEEN_WITHIN:
                for follower in list(waiting):
                    state = follower.cache.state(key)
                    if state is not None and state.watermark >= ts:
                        applied.append(time.time())
                        published = state.published_at
                        waiting.remove(follower)
                time.sleep(0.0005)
            if waiting:
                unseen += 1
            else:
                to_publish.append((published - ts) * 1000)
                to_apply.append((max(applied) - published) * 1000)
                total.append((max(applied) - ts) * 1000)
            _gap(rng)

        say("measuring the broker's floor (bare messages on the same two hops)...")
        conf = settings.kafka.confluent_config()
        hop_topic = f"{settings.topics.usage}.hop"
        hop_admin = admin(conf)  # kept referenced: a collected client fails its futures
        for future in hop_admin.create_topics([NewTopic(hop_topic, 1, 1)]).values():
            future.result(30)
        hops = min(args.calls, 150)
        usage_hop = broker_hop_ms(conf, hop_topic, settings.worker.fetch_max_wait_ms, hops, rng)
        states_hop = broker_hop_ms(conf, hop_topic, settings.client.fetch_max_wait_ms, hops, rng)
    finally:
        for client in clients:
            client.close(timeout=2)
        worker.stop()

    result = {
        "benchmark": "propagation",
        "calls": args.calls,
        "followers": args.followers,
        "not_seen_within_5s": unseen,
        "record_to_every_follower": _summary(total),
        "stages": {
            "produced_to_published": _summary(to_publish),
            "published_to_applied_by_last": _summary(to_apply),
        },
        "settings": {
            "client_flush_interval_ms": settings.client.flush_interval * 1000,
            "worker_fetch_max_wait_ms": settings.worker.fetch_max_wait_ms,
            "worker_publish_interval_ms": settings.worker.publish_interval * 1000,
            "client_fetch_max_wait_ms": settings.client.fetch_max_wait_ms,
        },
        # what the broker alone costs on the path: one hop with each of the two fetch waits
        "floor_broker_hops": {
            "usage_hop": _summary(usage_hop),
            "states_hop": _summary(states_hop),
        },
        "targets": {
            # issue 19: p99 <= 50 ms with 4 instances (quiet here; simulate measures it loaded)
            "propagation_p99_le_50ms": bool(total) and (percentile(total, 99) or 0) <= 50,
        },
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
