"""``quotaflow gateway``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

from quotaflow.settings import load_settings

log = logging.getLogger(__name__)


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

    async def main() -> None:
        quota = await asyncio.to_thread(QuotaClient(settings).open)
        gateway = Gateway(settings, quota)
        runner = await serve(gateway, g.listen_host, g.listen_port)
        log.info(
            "quotaflow gateway on http://%s:%d -> %s (keys from %s)",
            g.listen_host, g.listen_port, g.upstream, ",".join(g.key_sources),
        )  # fmt: skip
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            await quota.aclose()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
