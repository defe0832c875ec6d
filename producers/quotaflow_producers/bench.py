"""``quotaflow bench gateway``: the latency the gateway adds, against direct calls to the same
upstream measured in the same run (alternating, so machine noise hits both alike)."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

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


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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
                "p99_ms": round(_percentile(values, 0.99), 3),
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
