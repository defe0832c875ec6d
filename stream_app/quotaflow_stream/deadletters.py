"""Dead letters: what the worker refuses goes to the DLQ topic with its reason, never dropped.

A dead letter keeps the original message key and bytes (or the refused record's own bytes), and
says why in the ``quotaflow-dlq-reason`` header and where it came from
(``topic/partition/offset``) in ``quotaflow-dlq-origin``. A key that looks like a raw
credential is replaced: a leaked secret is not copied on.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from quotaflow.messages import Rejected
from quotaflow.record import REDACTED, looks_like_secret
from quotaflow_stream.counters import Counters

log = logging.getLogger(__name__)

DLQ_REASON_HEADER = "quotaflow-dlq-reason"
DLQ_ORIGIN_HEADER = "quotaflow-dlq-origin"


class HeadersTopic(Protocol):
    """Where dead letters go: a Faust topic (or a test's stand-in)."""

    async def send(self, *, key: bytes | None, value: bytes, headers: dict[str, bytes]) -> Any: ...


class DeadLetters:
    """Sends refused usage to the dead-letter topic; counts them."""

    def __init__(self, topic: HeadersTopic, counters: Counters) -> None:
        self.topic = topic
        self.counters = counters

    async def send(self, message: Any, rejected: Rejected) -> None:
        """Dead-letter ``rejected``, a part of ``message`` (a Faust message: topic, partition,
        offset, key)."""
        origin = f"{message.topic}/{message.partition}/{message.offset}"
        log.warning("usage rejected to DLQ (%s): %s", origin, rejected.reason)
        key = REDACTED.encode() if looks_like_secret(message.key) else message.key
        await self.topic.send(
            key=key,
            value=rejected.raw,
            headers={
                DLQ_REASON_HEADER: rejected.reason.encode(),
                DLQ_ORIGIN_HEADER: origin.encode(),
            },
        )
        self.counters.dlq += 1
