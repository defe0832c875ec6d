"""``quotaflow bench gateway|check|stream``: each figure beside its baseline, measured in the
same run on the embedded stack, printed as JSON.

- ``gateway``: the latency the gateway adds, against direct calls to the same upstream
  (alternating, so machine noise hits both alike).
- ``check``: ``QuotaClient.check()`` with 10k keys cached and a running follower, against the
  ``limits`` library's moving-window limiter on Redis (the same Valkey); ``record()`` with the
  broker up and unreachable; resident memory per cached key and per worker key-window.
- ``stream``: records one worker aggregates per second from messages the SDK's emitter packed,
  against a naive Faust worker (one record per message, one table update per record: see
  :mod:`quotaflow_stream.naive_baseline`), both counts verified exact.

Shared machines are noisy: latencies are medians over rounds, and ratios are what to compare."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from quotaflow.stats import percentile

POLICY = """
version: 1
policies:
  - {name: bench, default: true, max_staleness: 3600,
     limits: {requests_per_minute: 100000000, tokens_per_minute: 1000000000}}
"""


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks with their baselines, as JSON")
    bench = p.add_subparsers(dest="bench_command", metavar="WHAT")
    bench.required = True
    gw = bench.add_parser("gateway", help="latency the gateway adds over direct upstream calls")
    gw.add_argument("--requests", type=int, default=500, help="requests per path (500)")
    gw.add_argument("--stream", action="store_true", help="streamed chat completions")
    gw.add_argument("--json", action="store_true", help="print JSON only")
    gw.set_defaults(func=_cmd_gateway)
    chk = bench.add_parser("check", help="check()/record() latency vs the limits library")
    chk.add_argument("--keys", type=int, default=10_000, help="keys in the cache (10000)")
    chk.add_argument("--samples", type=int, default=100_000, help="checks per round (100000)")
    chk.add_argument("--rounds", type=int, default=5)
    chk.add_argument("--json", action="store_true", help="print JSON only")
    chk.set_defaults(func=_cmd_check)
    st = bench.add_parser("stream", help="worker records/s: packed vs one record per message")
    st.add_argument("--records", type=int, default=200_000, help="records to preload (200000)")
    st.add_argument("--keys", type=int, default=10_000)
    st.add_argument(
        "--baseline-records", type=int, default=20_000,
        help="records for the naive run (it is slow; the rate is what compares)",
    )  # fmt: skip
    st.add_argument("--json", action="store_true", help="print JSON only")
    st.set_defaults(func=_cmd_stream)


def _cmd_gateway(args: argparse.Namespace) -> int:
    import httpx

    from quotaflow.client import QuotaClient
    from quotaflow_producers.gateway.runner import GatewayThread
    from quotaflow_producers.upstream_stub import OpenAIStub
    from quotaflow_stream.devstack import embedded_stack, free_port, run_settings, stop_stack
    from quotaflow_stream.topics import ensure_topics

    if args.requests < 10:
        raise SystemExit("quotaflow bench gateway: --requests must be >= 10")
    # Per-request logs would be measured too, and drown the figures.
    for noisy in ("httpx", "aiohttp.access", "quotaflow_producers.gateway.server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_dir = Path(tempfile.mkdtemp(prefix="quotaflow-bench-"))
    stack, owned = embedded_stack(run_dir)
    stub = OpenAIStub().start()
    quota: QuotaClient | None = None
    gateway: GatewayThread | None = None
    try:
        settings = run_settings(stack, run_dir, f"bench-{uuid.uuid4().hex[:8]}")
        (run_dir / "policies.yaml").write_text(POLICY)
        settings.policies_file = run_dir / "policies.yaml"
        settings.gateway.upstream = f"http://127.0.0.1:{stub.port}"
        settings.gateway.listen_port = free_port()
        # the bench's key by header, as behind an authenticating proxy: one HMAC less per call
        settings.gateway.key_sources = ["header", "api_key"]
        ensure_topics(settings)
        quota = QuotaClient(settings).open()
        gateway = GatewayThread(settings, quota).start()
        payload: dict[str, Any] = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "Benchmark the gateway, please."}],
        }
        if args.stream:
            payload.update(stream=True, stream_options={"include_usage": True})
        targets = {"direct": stub.base_url, "gateway": gateway.base_url}
        headers = {"Authorization": "Bearer sk-bench-not-a-secret", "x-quotaflow-key": "bench"}
        samples: dict[str, list[float]] = {name: [] for name in targets}
        with httpx.Client(timeout=30) as http:
            for i in range(args.requests + 20):
                for name, base in targets.items():
                    start = time.perf_counter()
                    resp = http.post(f"{base}/chat/completions", json=payload, headers=headers)
                    resp.read()
                    elapsed = (time.perf_counter() - start) * 1000
                    if resp.status_code != 200:
                        raise SystemExit(f"bench: {name} answered {resp.status_code}: {resp.text}")
                    if i >= 20:  # warm-up discarded
                        samples[name].append(elapsed)
                    if not args.json and i % 100 == 0:
                        print(f"  {i}/{args.requests + 20}", file=sys.stderr, end="\r")
        stats = {
            name: {
                "p50_ms": round(statistics.median(values), 3),
                "p99_ms": round(percentile(values, 99) or 0.0, 3),
                "mean_ms": round(statistics.fmean(values), 3),
            }
            for name, values in samples.items()
        }
        direct, via = stats["direct"], stats["gateway"]
        result = {
            "benchmark": "gateway",
            "requests_per_path": args.requests,
            "stream": args.stream,
            "direct": direct,
            "gateway": via,
            "added_p50_ms": round(via["p50_ms"] - direct["p50_ms"], 3),
            "added_p99_ms": round(via["p99_ms"] - direct["p99_ms"], 3),
            "ratio_p50": round(via["p50_ms"] / direct["p50_ms"], 2),
            "ratio_p99": round(via["p99_ms"] / direct["p99_ms"], 2),
            "records_emitted": quota.stats()["records_sent"] + quota.stats()["records_buffered"],
        }
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        if quota is not None:
            quota.close()
        stub.stop()
        if owned:
            stop_stack(stack)


def _latencies(fn: Any, keys: list[str], samples: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    n = len(keys)
    for i in range(samples):
        key = keys[i % n]
        start = clock()
        fn(key)
        out.append(clock() - start)
    return out


def _summary_us(rounds: list[list[int]]) -> dict[str, float]:
    """Median over rounds of each round's p50 and p99, in microseconds."""
    p50 = statistics.median(statistics.median(r) for r in rounds) / 1000
    p99 = statistics.median(percentile(r, 99) or 0.0 for r in rounds) / 1000
    return {"p50_us": round(p50, 3), "p99_us": round(p99, 3), "rounds": len(rounds)}


def _memory_probe(what: str, count: int) -> dict[str, Any]:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "quotaflow_producers.memory_probe", what, str(count)],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


def _cmd_check(args: argparse.Namespace) -> int:
    from limits import RateLimitItemPerMinute
    from limits.storage import storage_from_string
    from limits.strategies import MovingWindowRateLimiter

    from quotaflow._kafka import producer as kafka_producer
    from quotaflow.client import QuotaClient
    from quotaflow.state import QuotaState
    from quotaflow_stream.devstack import embedded_stack, free_port, run_settings, stop_stack
    from quotaflow_stream.topics import ensure_topics

    def say(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr)

    run_dir = Path(tempfile.mkdtemp(prefix="quotaflow-bench-"))
    stack, owned = embedded_stack(run_dir)
    clients: list[QuotaClient] = []
    try:
        settings = run_settings(stack, run_dir, f"bench-{uuid.uuid4().hex[:8]}")
        (run_dir / "policies.yaml").write_text(POLICY)
        settings.policies_file = run_dir / "policies.yaml"
        ensure_topics(settings)
        keys = [f"bench-key-{i:06d}" for i in range(args.keys)]
        # The client follows first, then the states arrive through the topic (a warm start
        # would read them from Redis, which only a worker fills).
        quota = QuotaClient(settings).open()
        clients.append(quota)
        quota.wait_ready(60)
        say(f"publishing {len(keys)} quota states through the decisions topic...")
        producer = kafka_producer(settings.kafka.confluent_config())
        now = time.time()
        for key in keys:
            state = QuotaState(
                key=key, published_at=now, watermark=now,
                scopes={"": {60: (int(now // 60) * 60, 5, 500, 100, ())}},
                scope_policies={"": "bench"}, sources={"bench": now},
            )  # fmt: skip
            producer.produce(settings.topics.decisions, key=key.encode(), value=state.to_json())
            producer.poll(0)
        producer.flush(30)
        deadline = time.monotonic() + 60
        while len(quota.cache) < len(keys) and time.monotonic() < deadline:
            time.sleep(0.1)
        if len(quota.cache) < len(keys):
            raise SystemExit(f"bench: follower cached only {len(quota.cache)} of {len(keys)}")

        def check(key: str) -> None:
            quota.check(key, "gpt-4o", tokens=500)

        say("measuring check()...")
        _latencies(check, keys, 20_000)  # warm-up
        check_rounds = [_latencies(check, keys, args.samples) for _ in range(args.rounds)]

        say("measuring the limits library (moving window, Redis storage)...")
        limiter = MovingWindowRateLimiter(storage_from_string(stack.redis_url))
        item = RateLimitItemPerMinute(10**9)

        def limits_hit(key: str) -> None:
            limiter.hit(item, key)

        _latencies(limits_hit, keys, 500)
        base_samples = max(1000, args.samples // 50)
        base_rounds = [_latencies(limits_hit, keys, base_samples) for _ in range(args.rounds)]

        def record_with(client: QuotaClient) -> Any:
            def record(key: str) -> None:
                client.record(key, "gpt-4o", prompt_tokens=400, completion_tokens=100)

            return record

        say("measuring record() with the broker up...")
        rec_samples = max(1000, args.samples // 5)
        up = record_with(quota)
        _latencies(up, keys, 5_000)
        up_rounds = [_latencies(up, keys, rec_samples) for _ in range(args.rounds)]

        say("measuring record() with the broker unreachable...")
        away = settings.model_copy(deep=True)
        away.kafka.bootstrap_servers = f"127.0.0.1:{free_port()}"  # nothing listens there
        offline = QuotaClient(away, follow=False).open()
        clients.append(offline)
        down = record_with(offline)
        _latencies(down, keys, 5_000)
        down_rounds = [_latencies(down, keys, rec_samples) for _ in range(args.rounds)]

        say("measuring memory (fresh processes)...")
        sdk_mem = _memory_probe("sdk", 100_000)
        worker_mem = _memory_probe("worker", 1_000_000)

        check_s, base_s = _summary_us(check_rounds), _summary_us(base_rounds)
        up_s, down_s = _summary_us(up_rounds), _summary_us(down_rounds)
        result = {
            "benchmark": "check",
            "keys_cached": len(quota.cache),
            "check": check_s,
            "baseline_limits_moving_window_redis": base_s,
            "ratio_p50": round(base_s["p50_us"] / check_s["p50_us"], 1),
            "ratio_p99": round(base_s["p99_us"] / check_s["p99_us"], 1),
            "record_broker_up": up_s,
            "record_broker_unreachable": down_s,
            "memory": {"sdk": sdk_mem, "worker": worker_mem},
            "targets": {
                "check_p99_le_5us": check_s["p99_us"] <= 5,
                "check_20x_baseline_p99": base_s["p99_us"] / check_s["p99_us"] >= 20,
                "record_p99_le_10us_up": up_s["p99_us"] <= 10,
                "record_p99_le_10us_unreachable": down_s["p99_us"] <= 10,
            },
        }
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    finally:
        for client in clients:
            client.close(timeout=1)
        if owned:
            stop_stack(stack)


def stream_records(count: int, keys: int, seed: int = 7) -> list[Any]:
    """``count`` usage records as a fleet emits them: event time advancing at 100k records/s
    with a few ms of jitter, 50 instances with SDK-format ids, keys by a Zipf-like popularity
    (a few busy tenants, a long tail) and a realistic mix of models and token sizes."""
    import itertools
    import random

    from quotaflow.ids import record_id
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
    out = []
    for i in range(count):
        inst = rng.randrange(len(instances))
        counters[inst] += 1
        source, prefix = instances[inst]
        out.append(
            WireRecord(
                id=record_id(prefix, counters[inst]),
                ts=start + i / 100_000 + rng.random() * 0.005,
                key=chosen_keys[i],
                model=chosen_models[i],
                prompt_tokens=int(rng.lognormvariate(6, 1)) % 100_000,
                completion_tokens=int(rng.lognormvariate(4.5, 1)) % 20_000,
                source=source,
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


def _cmd_stream(args: argparse.Namespace) -> int:
    import redis

    from quotaflow._kafka import producer as kafka_producer
    from quotaflow.emitter import UsageEmitter
    from quotaflow.record import encode_records
    from quotaflow.state import QuotaState
    from quotaflow.transports import KafkaTransport
    from quotaflow_stream.devstack import embedded_stack, run_settings, stop_stack
    from quotaflow_stream.launcher import WorkerProcess
    from quotaflow_stream.topics import ensure_topics

    def say(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr)

    if args.records < 1 or args.baseline_records < 1 or args.keys < 1:
        raise SystemExit("quotaflow bench stream: --records, --keys and --baseline-records >= 1")
    run_dir = Path(tempfile.mkdtemp(prefix="quotaflow-bench-"))
    stack, owned = embedded_stack(run_dir)
    (run_dir / "policies.yaml").write_text(POLICY)

    def fresh_settings(label: str) -> Any:
        settings = run_settings(stack, run_dir, f"bench-{label}-{uuid.uuid4().hex[:6]}")
        settings.policies_file = run_dir / "policies.yaml"
        return settings

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

    def run_packed(records: list[Any]) -> dict[str, Any]:
        settings = fresh_settings("packed")
        ensure_topics(settings)
        say(f"packed: preloading {len(records)} records through the SDK's emitter...")
        transport = KafkaTransport(settings.kafka.confluent_config())
        emitter = UsageEmitter(transport, settings.topics.usage)
        emitter.start()
        for r in records:
            emitter.emit(r)
        if emitter.close(timeout=120):
            raise SystemExit("bench: preload not delivered")
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
            exact = _snapshot_matches(settings, _expected_totals(records), redis, QuotaState)
            seconds = max(stats["last_record_at"] - stats["first_record_at"], 1e-9)
            return {
                **rate(len(records), stats),
                # where the worker's time went, as shares of the measured run (saving is wall
                # time: folding goes on while the broker takes the changelog entries;
                # collecting overlaps the others, the collector runs inside them)
                "time_shares": {
                    part: round(stats.get(f"seconds_{part}", 0.0) / seconds, 3)
                    for part in ("folding", "publishing", "saving", "collecting")
                },
                "messages": stats["messages"],
                "records_per_message": round(len(records) / max(stats["messages"], 1), 1),
                "changelog_writes": stats.get("saved_entries"),
                "states_published": stats["states_published"],
                "counts_exact": exact,
            }
        finally:
            worker.stop()

    def run_naive(records: list[Any]) -> dict[str, Any]:
        import subprocess

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
                [sys.executable, "-m", "quotaflow_stream.naive_baseline", str(stats_path),
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

    try:
        say(f"generating {args.records} records over {args.keys} keys...")
        records = stream_records(args.records, args.keys)
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
    finally:
        if owned:
            stop_stack(stack)


def _snapshot_matches(
    settings: Any, expected: dict[str, list[int]], redis: Any, state_cls: Any
) -> bool:
    """The worker's per-key totals (Redis snapshot) equal a recount of what was sent."""
    client = redis.Redis.from_url(settings.redis.url)
    try:
        deadline = time.monotonic() + 30
        while True:
            got: dict[str, list[int]] = {}
            for key, raw in client.hscan_iter(settings.redis.states_hash, count=5000):
                t = state_cls.from_json(raw).totals
                got[key.decode()] = [t.requests, t.prompt_tokens, t.completion_tokens]
            if got == expected:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
    finally:
        client.close()
