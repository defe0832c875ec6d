"""The webhook sender against a real HTTP receiver on loopback that behaves like receivers do:
down, failing, rate limiting with Retry-After, refusing; and the forwarder's repeat dropping."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator

import pytest

from quotaflow._exceptions import ConfigError
from quotaflow.settings import load_settings
from quotaflow_stream.webhook import (
    ID_HEADER,
    SIGNATURE_HEADER,
    AlertForwarder,
    WebhookSender,
)
from tests.support.webhook import Receiver

SECRET = b"receiver-shared-secret"
EVENT = {"id": "a1", "key": "team-a", "limit": "requests_per_minute", "threshold": 0.8}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def sender(url: str, waits: list[float] | None = None) -> WebhookSender:
    return WebhookSender(url, SECRET, timeout=2, max_backoff=4,
                         sleep=(waits if waits is not None else []).append)  # fmt: skip


def test_a_delivery_is_signed_and_names_its_id(receiver: Receiver) -> None:
    delivery = sender(receiver.url).send(EVENT)
    assert delivery.delivered and delivery.attempts == 1 and delivery.status == 200
    [(headers, body)] = receiver.received
    assert json.loads(body) == EVENT
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected and headers[ID_HEADER] == "a1"


def test_failures_are_retried_with_backoff_and_retry_after(receiver: Receiver) -> None:
    receiver.script = [(500, {}), (503, {}), (429, {"Retry-After": "3"}), (502, {})]
    waits: list[float] = []
    delivery = sender(receiver.url, waits).send(EVENT)
    assert delivery.delivered and delivery.attempts == 5
    assert waits == [0.5, 1.0, 3.0, 4.0], "doubling, Retry-After honoured, capped at 4"
    bodies = {body for _, body in receiver.received}
    assert len(bodies) == 1, "every attempt is the same signed event"


def test_a_receiver_that_refuses_for_good_is_not_retried(receiver: Receiver) -> None:
    receiver.script = [(400, {})]
    delivery = sender(receiver.url).send(EVENT)
    assert not delivery.delivered and delivery.final and delivery.attempts == 1


def test_a_receiver_that_is_down_is_retried_until_it_is_up() -> None:
    r = Receiver()
    url = r.url
    r.close()  # nothing listens there now
    waits: list[float] = []
    attempts = {"n": 0}

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        attempts["n"] += 1
        if attempts["n"] == 3:
            raise KeyboardInterrupt  # the operator gives up; the event stays uncommitted

    s = WebhookSender(url, SECRET, timeout=1, max_backoff=4, sleep=sleep)
    with pytest.raises(KeyboardInterrupt):
        s.send(EVENT)
    assert waits == [0.5, 1.0, 2.0]


def test_a_stopping_forwarder_leaves_the_event_for_the_next_run(receiver: Receiver) -> None:
    receiver.script = [(500, {})]
    s = WebhookSender(receiver.url, SECRET, sleep=lambda _: None, should_stop=lambda: True)
    delivery = s.send(EVENT)
    assert not delivery.delivered and not delivery.final


def test_the_forwarder_drops_repeats_and_skips_what_is_not_an_alert(receiver: Receiver) -> None:
    forwarder = AlertForwarder(load_settings(), sender(receiver.url))
    for value in (json.dumps(EVENT).encode(), json.dumps(EVENT).encode(), b"garbage", None):
        forwarder.handle(value)
    assert len(receiver.received) == 1
    assert (forwarder.delivered, forwarder.repeats) == (1, 1)


def test_only_http_urls() -> None:
    with pytest.raises(ConfigError, match="http"):
        WebhookSender("file:///etc/passwd", None)
