"""``quotaflow bench gateway``: the latency the gateway adds over direct upstream calls."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from quotaflow.stats import percentile
from quotaflow_producers.bench.common import bench_run, cpu_seconds
from quotaflow_producers.bench.common import progress as progress_printer

T = TypeVar("T")

_PROMPT = "Benchmark the gateway, please."
#: Each route the bench can measure: its path below /v1, and a typical body.
ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/chat/completions",
             {"model": "gpt-4o", "messages": [{"role": "user", "content": _PROMPT}]}),
    "responses": ("/responses", {"model": "gpt-4o", "instructions": "Be brief.", "input": _PROMPT}),
    "messages": ("/messages", {"model": "claude-haiku-4-5", "max_tokens": 64,
                               "messages": [{"role": "user", "content": _PROMPT}]}),
    "images": ("/images/generations", {"model": "dall-e-3", "prompt": _PROMPT}),
}  # fmt: skip


def run_gateway(args: argparse.Namespace) -> int:

    if args.requests < 10:
        raise SystemExit("quotaflow bench gateway: --requests must be >= 10")
    # Per-request logs would be measured too, and drown the figures.
    for noisy in ("httpx", "aiohttp.access", "quotaflow_producers.gateway.server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with bench_run("bench-gateway") as (_, settings, run_dir):
        if args.concurrency > 1:
            return _measure_concurrent(args, settings, run_dir)
        return _measure(args, settings)


def _measure(args: argparse.Namespace, settings: Any) -> int:
    import httpx

    from quotaflow.client import QuotaClient
    from quotaflow_producers.gateway.runner import GatewayThread
    from quotaflow_producers.testing import OpenAIStub
    from quotaflow_stream.harness import ensure_topics, free_port

    stub = OpenAIStub().start()
    quota: QuotaClient | None = None
    gateway: GatewayThread | None = None
    try:
        settings.gateway.upstream = f"http://127.0.0.1:{stub.port}"
        settings.gateway.upstreams = {}  # the local upstream speaks Anthropic's API too
        settings.gateway.listen_port = free_port()
        # the bench's key by header, as behind an authenticating proxy: one HMAC less per call
        settings.gateway.key_sources = ["header", "api_key"]
        ensure_topics(settings)
        quota = QuotaClient(settings).open()
        gateway = GatewayThread(settings, quota).start()
        path, body = ROUTES[args.route]
        payload = dict(body)
        if args.stream:
            if args.route == "images":
                raise SystemExit("quotaflow bench gateway: images are not streamed")
            payload["stream"] = True
            if args.route == "chat":
                payload["stream_options"] = {"include_usage": True}
        targets = {"direct": stub.base_url, "gateway": gateway.base_url}
        headers = {"Authorization": "Bearer sk-bench-not-a-secret", "x-quotaflow-key": "bench"}
        samples: dict[str, list[float]] = {name: [] for name in targets}
        with httpx.Client(timeout=30) as http:
            for i in range(args.requests + 20):
                for name, base in targets.items():
                    start = time.perf_counter()
                    resp = http.post(base + path, json=payload, headers=headers)
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
            "route": args.route,
            "path": "/v1" + path,
            "requests_per_path": args.requests,
            "stream": args.stream,
            "direct": direct,
            "gateway": via,
            "added_p50_ms": round(via["p50_ms"] - direct["p50_ms"], 3),
            "added_p99_ms": round(via["p99_ms"] - direct["p99_ms"], 3),
            "ratio_p50": round(via["p50_ms"] / direct["p50_ms"], 2),
            "ratio_p99": round(via["p99_ms"] / direct["p99_ms"], 2),
            "records_emitted": _emitted(quota, args.requests + 20),
        }
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        if quota is not None:
            quota.close()
        stub.stop()


def _emitted(quota: Any, calls: int) -> int:
    """Records the gateway's client has emitted, once it has the ``calls`` made (or after
    10 s): a streamed call is settled just after its last bytes reach the caller, so the last
    call's record may come a moment after the bench has read its answer."""

    def emitted() -> int:
        stats = quota.stats()
        return int(stats["records_sent"] + stats["records_buffered"])

    return _poll(emitted, lambda n: n >= calls, 10.0, 0.02)


def _poll(read: Callable[[], T], enough: Callable[[T], bool], seconds: float, every: float) -> T:
    """``read()`` every ``every`` seconds until ``enough`` of it, or ``seconds`` have passed:
    the last reading."""
    deadline = time.monotonic() + seconds
    value = read()
    while not enough(value) and time.monotonic() < deadline:
        time.sleep(every)
        value = read()
    return value


# -- under concurrent load --------------------------------------------------------------------


def _measure_concurrent(args: argparse.Namespace, settings: Any, run_dir: Path) -> int:
    """Requests/s and latency at ``--concurrency`` connections, straight to the upstream and
    through the gateway, alternating rounds. The upstream, the gateway and a stream worker each
    run in a process of their own, as in production, so none shares the load generator's
    interpreter; the worker acknowledges the gateway's usage, as it does in production (without
    it, a key's unacknowledged usage would only grow, and every read of it with it)."""
    import os
    import subprocess

    import httpx

    from quotaflow_stream.harness import WorkerProcess, ensure_topics, free_port

    say = progress_printer(args.json)
    path, body = ROUTES[args.route]
    ensure_topics(settings)
    env = {
        **os.environ,
        **settings.to_env(),
        "QUOTAFLOW_GATEWAY__KEY_SOURCES": '["header","api_key"]',
        "QUOTAFLOW_CLIENT__SOURCE": "bench-gateway",
    }
    processes: list[subprocess.Popen[str]] = []
    worker = WorkerProcess(settings, run_dir / "worker.log", loglevel="warn").start()
    try:
        worker.wait_ready(90)
        stub = subprocess.Popen([sys.executable, "-m", "quotaflow_producers.testing"],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        processes.append(stub)
        assert stub.stdout is not None
        upstream = f"http://127.0.0.1:{int(stub.stdout.readline())}"
        port = free_port()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "quotaflow", "gateway", "--upstream", upstream,
             "--listen", f"127.0.0.1:{port}", "--processes", str(args.gateway_processes)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        processes.append(gateway)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        pids: set[int] = set()
        while True:
            try:  # ready, and every process answering (fresh connections spread over them)
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    pids.add(httpx.get(base + "/healthz", timeout=2).json()["pid"])
                if len(pids) >= args.gateway_processes:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise SystemExit("bench: the gateway did not become ready")
            time.sleep(0.2)
        targets = {"direct": upstream + "/v1" + path, "gateway": base + "/v1" + path}
        headers = {"Authorization": "Bearer sk-bench-not-a-secret", "x-quotaflow-key": "bench"}
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        warm_up = max(200, args.requests // 10)
        for url in targets.values():  # warm-up: connections, caches, the first records
            _load(url, body, headers, args.concurrency, warm_up)
        # whose CPU time each target's requests cost: the upstream's alone, or the gateway's
        # (its processes) apart from the upstream it calls
        servers = {"direct": stub.pid, "gateway": gateway.pid}
        for r in range(args.rounds):
            for name, url in targets.items():
                say(f"round {r + 1}/{args.rounds}: {name} at {args.concurrency} connections")
                before = cpu_seconds(servers[name])
                figures = _load(url, body, headers, args.concurrency, args.requests)
                used = cpu_seconds(servers[name]) - before
                figures["cpu_us_per_request"] = used * 1e6 / args.requests
                figures["requests_per_cpu_s"] = args.requests / used if used > 0 else 0.0
                rounds[name].append(figures)
        summary = {
            name: {
                metric: round(statistics.median(rd[metric] for rd in runs), 3)
                for metric in ("requests_per_s", "p50_ms", "p99_ms", "cpu_us_per_request",
                               "requests_per_cpu_s")
            }
            for name, runs in rounds.items()
        }  # fmt: skip
        direct, via = summary["direct"], summary["gateway"]
        # every call through the gateway is a record: wait (briefly) until the worker has them
        calls = warm_up + args.rounds * args.requests
        counted = _poll(lambda: worker.stats() or {}, lambda st: st.get("records", 0) >= calls,
                        20.0, 0.2)  # fmt: skip
        result = {
            "benchmark": "gateway_concurrency",
            "route": args.route,
            "concurrency": args.concurrency,
            "gateway_processes": args.gateway_processes,
            "requests_per_round": args.requests,
            "rounds": args.rounds,
            "direct": direct,
            "gateway": via,
            "throughput_ratio": round(via["requests_per_s"] / direct["requests_per_s"], 3),
            # the worker counted the gateway's usage and published the key's states meanwhile
            "worker": {
                "gateway_calls": calls,
                **{k: counted.get(k) for k in ("records", "states_published", "dlq")},
            },
            "targets": {  # issue 19: per gateway process at 32 connections
                "gateway_ge_4000_rps": via["requests_per_s"] >= 4000,
                # what one gateway process would serve with a core of its own
                "gateway_ge_4000_rps_per_cpu_s": via["requests_per_cpu_s"] >= 4000,
                "gateway_p99_le_25ms": via["p99_ms"] <= 25,
            },
        }
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        worker.stop()


def _load(
    url: str, body: dict[str, Any], headers: dict[str, str], concurrency: int, total: int
) -> dict[str, float]:
    """``total`` requests over ``concurrency`` connections: requests/s and latency (ms)."""
    import asyncio

    import aiohttp

    async def run() -> dict[str, float]:
        latencies: list[float] = []
        todo = iter(range(total))
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                for _ in todo:
                    start = time.perf_counter()
                    async with session.post(url, json=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise SystemExit(f"bench: {url} answered {resp.status}")
                    latencies.append((time.perf_counter() - start) * 1000)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        return {
            "requests_per_s": total / elapsed,
            "p50_ms": statistics.median(latencies),
            "p99_ms": percentile(latencies, 99) or 0.0,
        }

    return asyncio.run(run())
