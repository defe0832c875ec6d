"""The Kafka edge: every confluent-kafka client quotaflow builds, and the one place where
librdkafka's errors become quotaflow's.

Every producer here uses Kafka's default partitioner (murmur2, as the Java client and aiokafka
compute it) instead of librdkafka's crc32, so a record keyed by its counter key lands where the
SDK's :mod:`quotaflow.partitioner` and the worker expect it. Every client logs through
:class:`ClientLog`, never raw to stderr: a broker that is away makes librdkafka report each
reconnect attempt, hundreds of lines a minute.

:func:`kafka_errors` translates confluent-kafka's exceptions into the
:class:`~quotaflow.QuotaflowError` tree, as httpx's ``map_exceptions`` does for its transports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from quotaflow._exceptions import BrokerError, BrokerUnavailable, TransportFull

log = logging.getLogger(__name__)

#: The partitioner of Kafka's Java client (and aiokafka): murmur2 of the key.
PARTITIONER = "murmur2_random"

#: What to do when the broker cannot be reached, said once in every such error.
BROKER_FIX = (
    "start the embedded broker with `quotaflow dev up`, "
    "or point QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS at a running Kafka"
)

# librdkafka's codes for "no broker answered" (names, so confluent-kafka needs no import here)
_UNREACHABLE = frozenset({"_TRANSPORT", "_ALL_BROKERS_DOWN", "_TIMED_OUT", "_RESOLVE"})


class ClientLog:
    """The ``logger`` handed to librdkafka: a broker that is away makes it report every
    reconnect attempt, so repeats of one message are held back for ``every`` seconds."""

    def __init__(self, name: str = "quotaflow.kafka", every: float = 30.0) -> None:
        self._log = logging.getLogger(name)
        self._every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, level: int, msg: str, *args: Any) -> None:
        text = msg % args if args else msg
        # Drop the volatile parts (timings, ports) so repeats of one event match.
        sig = "".join(ch for ch in text if not ch.isdigit())[:160]
        now = time.monotonic()
        if now - self._last.get(sig, -1e9) < self._every:
            self._held[sig] = self._held.get(sig, 0) + 1
            return
        held = self._held.pop(sig, 0)
        self._last[sig] = now
        suffix = f" (and {held} more like it)" if held else ""
        self._log.log(level, "%s%s", text, suffix)


def producer(config: Mapping[str, Any], **overrides: Any) -> Any:
    """A confluent-kafka ``Producer``: Kafka's partitioner, idempotence, logs through logging.
    ``overrides`` use librdkafka's names with ``_`` for ``.`` (``linger_ms=5``); ``config``
    (the user's settings) wins over both."""
    from confluent_kafka import Producer

    conf = {"partitioner": PARTITIONER, "enable.idempotence": True, **_dotted(overrides)}
    return Producer({**conf, **config}, logger=ClientLog())


def consumer(config: Mapping[str, Any], group: str, **overrides: Any) -> Any:
    """A confluent-kafka ``Consumer`` in ``group`` that commits nothing by itself."""
    from confluent_kafka import Consumer

    conf = {"group.id": group, "enable.auto.commit": False, **_dotted(overrides)}
    return Consumer({**conf, **config}, logger=ClientLog())


def admin(config: Mapping[str, Any], **overrides: Any) -> Any:
    """A confluent-kafka ``AdminClient`` that logs through logging."""
    from confluent_kafka.admin import AdminClient

    return AdminClient({**_dotted(overrides), **config}, logger=ClientLog())


def _dotted(options: Mapping[str, Any]) -> dict[str, Any]:
    return {name.replace("_", "."): value for name, value in options.items()}


@contextmanager
def kafka_errors(what: str, bootstrap: str) -> Iterator[None]:
    """Translate confluent-kafka's exceptions raised inside into quotaflow's.

    ``what`` names the operation (``"creating topics"``) and ``bootstrap`` the servers, so the
    error says what failed, where, and (for an unreachable broker) how to fix it."""
    from confluent_kafka import KafkaException

    try:
        yield
    except BufferError as exc:
        raise TransportFull(f"{what}: the producer's queue is full ({exc})") from None
    except KafkaException as exc:
        error: Any = exc.args[0] if exc.args else None
        name = error.name() if hasattr(error, "name") else ""
        text = error.str() if hasattr(error, "str") else str(exc)
        if name in _UNREACHABLE:
            raise BrokerUnavailable(
                f"{what}: cannot reach Kafka at {bootstrap} ({text}); {BROKER_FIX}"
            ) from None
        raise BrokerError(f"{what} on Kafka at {bootstrap}: {text}") from None
