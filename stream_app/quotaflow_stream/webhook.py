"""Alert events to a webhook: signed, retried with backoff, delivered at least once.

:class:`AlertForwarder` consumes the alerts topic in its own consumer group and POSTs each
event as JSON. A delivery is done when the receiver answers 2xx; only then is the event's
offset committed, so a forwarder that dies re-sends from the last committed one. Events carry
an ``id`` (and the ``X-Quotaflow-Alert-Id`` header): a repeat, from a worker that fired twice
around a crash or from this forwarder after a restart, is the same id, for the receiver to drop;
the forwarder itself drops ids it has already delivered (the last :data:`SEEN_IDS`).

Connection errors, timeouts, 408, 429 and 5xx are retried, backing off from 0.5 s doubling to
``max_backoff`` (a ``Retry-After`` in seconds is honoured within it); any other 4xx is the
receiver refusing the event for good: it is logged and skipped, never retried forever.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quotaflow._exceptions import ConfigError
from quotaflow.settings import QuotaflowSettings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Quotaflow-Signature"
ID_HEADER = "X-Quotaflow-Alert-Id"
#: Delivered ids remembered, to drop repeats before they reach the receiver.
SEEN_IDS = 100_000
_RETRIED = frozenset({408, 429})


def signature(secret: bytes, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the exact body, as GitHub signs its webhooks."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass
class Delivery:
    """How one event went: ``attempts`` made, the last status (None: never answered), and
    whether it is done with: delivered, or refused for good (not: the forwarder is stopping)."""

    id: str
    attempts: int
    status: int | None
    delivered: bool
    final: bool = True


class WebhookSender:
    """POSTs one event until it is delivered or refused for good."""

    def __init__(
        self,
        url: str,
        secret: bytes | None,
        *,
        timeout: float = 10.0,
        max_backoff: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--webhook {url!r}: expected an http:// or https:// URL")
        self.url = url
        self.secret = secret
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._should_stop = should_stop

    def send(self, event: dict[str, Any]) -> Delivery:
        body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
        headers = {"Content-Type": "application/json", ID_HEADER: str(event.get("id", ""))}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.secret, body)
        backoff, attempts = 0.5, 0
        while True:
            attempts += 1
            status, retry_after = self._post(body, headers)
            if status is not None and 200 <= status < 300:
                return Delivery(str(event.get("id")), attempts, status, True)
            if status is not None and 400 <= status < 500 and status not in _RETRIED:
                log.error("webhook refused alert %s with HTTP %d; skipped", event.get("id"), status)
                return Delivery(str(event.get("id")), attempts, status, False)
            if self._should_stop():
                return Delivery(str(event.get("id")), attempts, status, False, final=False)
            wait = min(retry_after if retry_after is not None else backoff, self.max_backoff)
            log.warning("webhook answered %s for alert %s; retrying in %.1fs",
                        status or "nothing", event.get("id"), wait)  # fmt: skip
            self._sleep(wait)
            backoff = min(backoff * 2, self.max_backoff)

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int | None, float | None]:
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return resp.status, None
        except urllib.error.HTTPError as exc:
            retry = exc.headers.get("Retry-After") if exc.headers else None
            try:
                return exc.code, float(retry) if retry else None
            except ValueError:
                return exc.code, None
        except (OSError, ValueError):  # refused, reset, timed out
            return None, None


class AlertForwarder:
    """Follows the alerts topic and hands each event, once per id, to a :class:`WebhookSender`."""

    def __init__(self, settings: QuotaflowSettings, sender: WebhookSender) -> None:
        self.settings = settings
        self.sender = sender
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.delivered = 0
        self.repeats = 0
        self.refused = 0
        self.stopped = False

    def run(self, *, until: Callable[[], bool] = lambda: False, poll: float = 0.5) -> None:
        from quotaflow._kafka import consumer as kafka_consumer
        from quotaflow._kafka import kafka_errors

        s = self.settings
        consumer = kafka_consumer(
            s.kafka.confluent_config(), s.alerts.group_id, auto_offset_reset="earliest"
        )
        with kafka_errors(f"following {s.topics.alerts!r}", s.kafka.bootstrap_servers):
            consumer.subscribe([s.topics.alerts])
        try:
            while not until() and not self.stopped:
                msg = consumer.poll(poll)
                if msg is None or msg.error() is not None:
                    continue
                delivery = self.handle(msg.value())
                if delivery is not None and not delivery.final:
                    break  # stopping mid-retry: uncommitted, so the next run sends it again
                consumer.commit(message=msg, asynchronous=False)
        finally:
            consumer.close()

    def handle(self, value: bytes | None) -> Delivery | None:
        try:
            event = json.loads(value or b"")
            alert_id = str(event["id"])
        except (ValueError, KeyError, TypeError):
            log.error("not an alert event, skipped: %r", (value or b"")[:200])
            return None
        if alert_id in self._seen:
            self.repeats += 1
            return None
        delivery = self.sender.send(event)
        if not delivery.final:
            return delivery
        if delivery.delivered:
            self.delivered += 1
        else:
            self.refused += 1
        self._seen[alert_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)
        return delivery
