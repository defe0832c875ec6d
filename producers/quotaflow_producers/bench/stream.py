"""``quotaflow bench stream``: records/s one worker aggregates from packed messages, against a
naive Faust worker in the same run, counts verified."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quotaflow_producers.bench.common import bench_run, more_settings, progress


def stream_records(count: int, keys: int, seed: int = 7) -> list[Any]:
    """``count`` usage records as a fleet emits them: event time advancing at 100k records/s
    with a few ms of jitter, 50 instances with SDK-format ids, keys by a Zipf-like popularity
    (a few busy tenants, a long tail) and a realistic mix of models and token sizes."""
    import itertools
    import random

    from quotaflow.ids import record_id
    from quotaflow.prices import PriceTable
    from quotaflow.record import WireRecord

    rng = random.Random(seed)
    names = [f"tenant-{i:05d}" for i in range(keys)]
    key_weights = list(itertools.accumulate(1.0 / (rank + 1) ** 0.8 for rank in range(keys)))
    models = ["gpt-4o-mini", "gpt-4o", "o3-mini", "text-embedding-3-small", "claude-sonnet"]
    model_weights = list(itertools.accumulate([40, 25, 10, 15, 10]))
    instances = [(f"svc-{i:02d}", f"{rng.getrandbits(64):016x}") for i in range(50)]
    counters = [0] * len(instances)
    start = time.time() - count / 100_000 - 5
    chosen_keys = rng.choices(names, cum_weights=key_weights, k=count)
    chosen_models = rng.choices(models, cum_weights=model_weights, k=count)
    # priced as the SDK prices them (record() puts the cost on every record it sends)
    table = PriceTable()
    out = []
    for i in range(count):
        inst = rng.randrange(len(instances))
        counters[inst] += 1
        source, prefix = instances[inst]
        ts = start + i / 100_000 + rng.random() * 0.005
        prompt = int(rng.lognormvariate(6, 1)) % 100_000
        completion = int(rng.lognormvariate(4.5, 1)) % 20_000
        prices = table.lookup(chosen_models[i], None, ts)
        out.append(
            WireRecord(
                id=record_id(prefix, counters[inst]),
                ts=ts,
                key=chosen_keys[i],
                model=chosen_models[i],
                prompt_tokens=prompt,
                completion_tokens=completion,
                source=source,
                cost_micros=prices.cost(prompt, completion) if prices is not None else None,
                price_version=table.version if prices is not None else None,
            )
        )
    return out


def _expected_totals(records: list[Any]) -> dict[str, list[int]]:
    expected: dict[str, list[int]] = {}
    for r in records:
        t = expected.setdefault(r.key, [0, 0, 0])
        t[0] += r.requests
        t[1] += r.prompt_tokens
        t[2] += r.completion_tokens
    return expected


def run_stream(args: argparse.Namespace) -> int:
    if args.records < 1 or args.baseline_records < 1 or args.keys < 1:
        raise SystemExit("quotaflow bench stream: --records, --keys and --baseline-records >= 1")
    with bench_run("bench-stream") as (stack, settings, run_dir):
        return _measure(args, lambda label: more_settings(stack, run_dir, label, settings), run_dir)


def _measure(args: argparse.Namespace, fresh_settings: Any, run_dir: Any) -> int:
    import redis

    from quotaflow._kafka import producer as kafka_producer
    from quotaflow.emitter import UsageEmitter
    from quotaflow.messages import encode_records
    from quotaflow.state import QuotaState
    from quotaflow.transports import KafkaTransport
    from quotaflow_stream.harness import WorkerProcess, ensure_topics, free_port

    say = progress(args.json)

    def wait_for(label: str, expected: int, progress: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 900
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            stats = progress() or stats
            done = stats.get("records", 0)
            say(f"  {label}: {done}/{expected} records")
            if done >= expected:
                return stats
            time.sleep(0.5)
        raise SystemExit(f"bench: {label} worker stalled at {stats.get('records')}")

    def rate(records: int, stats: dict[str, Any]) -> dict[str, Any]:
        first, last = stats["first_record_at"], stats["last_record_at"]
        seconds = max(last - first, 1e-9)
        return {"records": records, "seconds": round(seconds, 3),
                "records_per_s": round(records / seconds)}  # fmt: skip

    def send(settings: Any, records: list[Any]) -> None:
        """Send the records as the SDK does: packed per partition by its emitter."""
        emitter = UsageEmitter(KafkaTransport(settings.kafka.confluent_config()),
                               settings.topics.usage)  # fmt: skip
        emitter.start()
        for r in records:
            emitter.emit(r)
        if emitter.close(timeout=120):
            raise SystemExit("bench: records not delivered")

    def run_packed(records: list[Any]) -> dict[str, Any]:
        settings = fresh_settings("packed")
        ensure_topics(settings)
        say(f"packed: preloading {len(records)} records through the SDK's emitter...")
        send(settings, records)
        worker = WorkerProcess(settings, run_dir / "worker-packed.log", loglevel="warn")
        worker.start()
        try:
            worker.wait_ready(120)
            stats = wait_for("packed", len(records), worker.stats)
            # and saved: every message acked once its entries are in the changelog
            deadline = time.monotonic() + 30
            while (stats.get("unacked_messages") or stats.get("unsaved_entries")) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.2)
                stats = worker.stats() or stats
            matched = _snapshot_matches(settings, _expected_totals(records), redis, QuotaState)
            seconds = max(stats["last_record_at"] - stats["first_record_at"], 1e-9)
            return {
                **rate(len(records), stats),
                # where the worker's time went, as shares of the measured run (saving is wall
                # time: folding goes on while the broker takes the changelog entries;
                # collecting overlaps the others, the collector runs inside them)
                "time_shares": {
                    part: round(spent / seconds, 3)
                    for part, spent in zip(
                        ("folding", "saving", "publishing", "collecting"),
                        (stats["seconds_folding"], *stats["at_last_record"]),
                        strict=True,
                    )
                },
                "messages": stats["messages"],
                "records_per_message": round(len(records) / max(stats["messages"], 1), 1),
                "changelog_writes": stats.get("saved_entries"),
                "states_published": stats["states_published"],
                "counts_exact": matched is not None,
                # the last record folded -> every key's final state in the snapshot
                "states_current_after_s": (
                    None if matched is None else round(matched - stats["last_record_at"], 2)
                ),
            }
        finally:
            worker.stop()

    def run_naive(records: list[Any]) -> dict[str, Any]:
        settings = fresh_settings("naive")
        ensure_topics(settings)
        say(f"naive: preloading {len(records)} records, one per message...")
        producer = kafka_producer(
            settings.kafka.confluent_config(), linger_ms=20, queue_buffering_max_messages=1_000_000
        )
        for r in records:
            producer.produce(settings.topics.usage, key=r.key.encode(), value=encode_records([r]))
            producer.poll(0)
        producer.flush(120)
        stats_path = run_dir / "naive-stats.json"
        env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
        with open(run_dir / "worker-naive.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "quotaflow_producers.bench.naive_worker", str(stats_path),
                 str(len(records))],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

        def progress() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise SystemExit(f"bench: the naive worker exited with {proc.returncode}")
            try:
                return dict(json.loads(stats_path.read_text()))
            except (OSError, ValueError):
                return None

        try:
            stats = wait_for("naive", len(records), progress)
            while "totals" not in stats:  # the totals follow the count within a report
                time.sleep(0.2)
                stats = progress() or stats
            return {
                **rate(len(records), stats),
                "messages": len(records),
                "changelog_writes": len(records),
                "counts_exact": stats["totals"] == _expected_totals(records),
            }
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def run_group(records: list[Any], workers: int) -> dict[str, Any]:
        """``workers`` workers in one consumer group, ready (partitions shared out) before the
        records are sent, so no rebalance falls inside the measured span."""
        settings = fresh_settings(f"group{workers}")
        ensure_topics(settings)
        procs = []
        for i in range(workers):
            own = settings.model_copy(deep=True)
            own.worker.web_port = free_port()
            own.worker.data_dir = Path(settings.worker.data_dir) / f"worker-{i}"
            procs.append(WorkerProcess(own, run_dir / f"worker-group{workers}-{i}.log",
                                       loglevel="warn").start())  # fmt: skip
        try:
            for proc in procs:
                proc.wait_ready(120)
            say(f"{workers} worker(s): sending {len(records)} records through the emitter...")
            send(settings, records)

            def combined() -> dict[str, Any] | None:
                stats = [proc.stats() for proc in procs]
                if any(st is None for st in stats):
                    return None
                return {"records": sum(st["records"] for st in stats if st), "each": stats}

            done = wait_for(f"{workers} worker(s)", len(records), combined)
            each = [st for st in done["each"] if st and st.get("first_record_at")]
            first = min(st["first_record_at"] for st in each)
            last = max(st["last_record_at"] for st in each)
            matched = _snapshot_matches(settings, _expected_totals(records), redis, QuotaState)
            return {
                **rate(len(records), {"first_record_at": first, "last_record_at": last}),
                "records_per_worker": [st["records"] for st in done["each"] if st],
                "counts_exact": matched is not None,
            }
        finally:
            for proc in procs:
                proc.stop()

    say(f"generating {args.records} records over {args.keys} keys...")
    records = stream_records(args.records, args.keys)
    if args.workers > 1:
        one = run_group(records, 1)
        group = run_group(records, args.workers)
        efficiency = group["records_per_s"] / (args.workers * max(one["records_per_s"], 1))
        result = {
            "benchmark": "stream_workers",
            "keys": args.keys,
            "workers": args.workers,
            "one_worker": one,
            "group": group,
            "scaling_efficiency": round(efficiency, 3),
            "counts_exact": one["counts_exact"] and group["counts_exact"],
        }
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    packed = run_packed(records)
    naive = run_naive(records[: args.baseline_records])
    speedup = packed["records_per_s"] / max(naive["records_per_s"], 1)
    result = {
        "benchmark": "stream",
        "keys": args.keys,
        "packed": packed,
        "naive_baseline": naive,
        "speedup": round(speedup, 1),
        "targets": {
            "records_per_s_ge_100k": packed["records_per_s"] >= 100_000,
            "speedup_ge_20x": speedup >= 20,
            "counts_exact": packed["counts_exact"] and naive["counts_exact"],
        },
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _snapshot_matches(
    settings: Any, expected: dict[str, list[int]], redis: Any, state_cls: Any
) -> float | None:
    """When (wall clock) the worker's per-key totals in the Redis snapshot equalled a recount
    of what was sent, waiting up to 30 s; None if they never did."""
    client = redis.Redis.from_url(settings.redis.url)
    try:
        deadline = time.monotonic() + 30
        while True:
            got: dict[str, list[int]] = {}
            for key, raw in client.hscan_iter(settings.redis.states_hash, count=5000):
                t = state_cls.from_json(raw).totals
                got[key.decode()] = [t.requests, t.prompt_tokens, t.completion_tokens]
            if got == expected:
                return time.time()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)
    finally:
        client.close()
