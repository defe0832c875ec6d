"""Run a gateway on its own event loop in a background thread (benchmarks and tests)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from quotaflow.client import QuotaClient
from quotaflow.settings import QuotaflowSettings
from quotaflow_producers.gateway.server import Gateway, serve


class GatewayThread:
    def __init__(self, settings: QuotaflowSettings, quota: QuotaClient, **options: Any) -> None:
        self.gateway = Gateway(settings, quota, **options)
        self.host = settings.gateway.listen_host
        self.port = settings.gateway.listen_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> GatewayThread:
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(
            serve(self.gateway, self.host, self.port), self._loop
        ).result(10)
        if self.port == 0:
            for address in self._runner.addresses:
                self.port = int(address[1])
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
