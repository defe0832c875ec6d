"""``quotaflow gateway``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
from typing import Any

from quotaflow.settings import load_settings

log = logging.getLogger(__name__)

#: Cycle-collector thresholds of a gateway process. Each call allocates a few hundred objects
#: that die with it, and Python's default (a young collection every 700 allocations, a full one
#: every 100 of those) made full collections over the long-lived start-up objects (tokenizers,
#: prices, policies, aiohttp) the gateway's tail: bench gateway --concurrency 32, p99 66 ms
#: against 94-102 ms. Those objects are also frozen out of every collection once started.
GC_THRESHOLDS = (50_000, 20, 100)


def register(sub: Any) -> None:
    p = sub.add_parser("gateway", help="run the OpenAI-compatible metering gateway")
    p.add_argument(
        "--upstream",
        help="upstream base URL of every route (default: settings: api.openai.com, and "
        "api.anthropic.com for /v1/messages)",
    )
    p.add_argument(
        "--route", action="append", default=[], metavar="PREFIX=URL",
        help="send paths under PREFIX to URL (repeatable; e.g. /v1/messages=https://api.anthropic.com)",
    )  # fmt: skip
    p.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8787)")
    p.add_argument(
        "--processes", type=int, default=1, metavar="N",
        help="N gateway processes (a core each) sharing the port (SO_REUSEPORT) under a "
        "supervisor that restarts them and stops them cleanly",
    )  # fmt: skip
    p.set_defaults(func=_cmd_gateway)


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SystemExit(f"quotaflow gateway: --listen expects HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from quotaflow.client import QuotaClient
    from quotaflow_producers.gateway.server import Gateway, serve

    settings = load_settings()
    if settings.otel.enabled:
        from quotaflow.otel import configure_otlp

        configure_otlp(settings.otel.service_name)
    if args.upstream:
        # the one-upstream shortcut: every route, Anthropic's included, goes there
        settings.gateway.upstream = args.upstream
        settings.gateway.upstreams = {}
    for item in args.route:
        prefix, sep, url = item.partition("=")
        if not sep or not prefix.startswith("/") or not url.startswith(("http://", "https://")):
            raise SystemExit(
                f"quotaflow gateway: --route expects /PREFIX=http(s)://URL, got {item!r}"
            )
        settings.gateway.upstreams[prefix] = url
    if args.listen:
        settings.gateway.listen_host, settings.gateway.listen_port = _listen(args.listen)
    g = settings.gateway
    if args.processes != 1:
        return _supervise(args, settings)
    shared = os.environ.get(_SHARED_PORT) == "1"  # a child of --processes

    async def main() -> None:
        quota = await asyncio.to_thread(QuotaClient(settings).open)
        gateway = Gateway(settings, quota)
        runner = await serve(gateway, g.listen_host, g.listen_port, reuse_port=shared)
        gc.collect()
        gc.freeze()  # what start-up built lives as long as the process: never scan it again
        gc.set_threshold(*GC_THRESHOLDS)
        log.info(
            "quotaflow gateway on http://%s:%d -> %s (keys from %s)",
            g.listen_host, g.listen_port, g.upstream, ",".join(g.key_sources),
        )  # fmt: skip
        # SIGTERM (Docker, Kubernetes, the supervisor) stops as SIGINT does: in-flight calls
        # finish and are settled, and buffered usage is delivered (or journaled), not lost
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("quotaflow gateway: stopping (finishing calls, delivering usage)")
            await runner.cleanup()
            undelivered = await quota.aclose()
            if undelivered:
                log.error("quotaflow gateway: %d usage messages undelivered", undelivered)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


#: Set in the children of ``--processes``: they listen with SO_REUSEPORT.
_SHARED_PORT = "QUOTAFLOW_GATEWAY_SHARED_PORT"


def _supervise(args: argparse.Namespace, settings: Any) -> int:
    import sys

    from quotaflow_stream.supervisor import Supervisor

    g = settings.gateway
    if g.listen_port == 0:
        raise SystemExit("quotaflow gateway: --processes needs a fixed --listen port")
    command = [sys.executable, "-m", "quotaflow", "gateway"]
    try:
        supervisor = Supervisor.gateways(settings, args.processes, command)
    except ValueError as exc:
        raise SystemExit(f"quotaflow gateway: {exc}") from None
    for child in supervisor.children:
        child.env[_SHARED_PORT] = "1"
    log.info("quotaflow gateway: %d processes on http://%s:%d", args.processes, g.listen_host,
             g.listen_port)  # fmt: skip
    return supervisor.run()
