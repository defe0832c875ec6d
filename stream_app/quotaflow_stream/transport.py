"""Faust's aiokafka transport with a configurable fetch wait.

Faust hard-codes ``fetch_max_wait_ms=1500`` for its worker consumer. A broker that holds a fetch
until that wait expires whenever no data was ready at request time (Tansu does) then delays
every usage message by ~0.75 s on average, which is the whole propagation budget of a quota
decision. This transport lowers the wait; it is registered as the ``quotaflow-kafka://`` scheme
through the ``faust.transports`` entry point.
"""

from __future__ import annotations

from typing import Any, ClassVar

import faust
from faust.transport.drivers import aiokafka as driver

#: The fetch wait of an app that was not given one (``settings.worker.fetch_max_wait_ms``).
DEFAULT_FETCH_MAX_WAIT_MS = 20

# Per app, so two apps in one process (tests, benches) keep their own.
_APP_ATTRIBUTE = "quotaflow_fetch_max_wait_ms"


def set_fetch_max_wait(app: faust.App, milliseconds: int) -> None:
    """The fetch wait ``app``'s worker consumer will use."""
    setattr(app, _APP_ATTRIBUTE, milliseconds)


def fetch_max_wait(app: Any) -> int:
    return int(getattr(app, _APP_ATTRIBUTE, DEFAULT_FETCH_MAX_WAIT_MS))


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by aiokafka when the consumer starts and builds its fetcher.
        consumer._fetch_max_wait_ms = fetch_max_wait(transport.app)
        return consumer


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer: ClassVar[Any] = Consumer
