"""``quotaflow bench gateway``: the latency the gateway adds over direct upstream calls."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from typing import Any

from quotaflow.stats import percentile
from quotaflow_producers.bench.common import bench_run

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
    with bench_run("bench-gateway") as (_, settings, _):
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
