"""``quotaflow alerts tail | forward``: follow the soft-budget alerts, or POST them to a webhook."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
import uuid
from typing import Any

from quotaflow.settings import load_settings


def register(sub: Any) -> None:
    p = sub.add_parser("alerts", help="soft-budget alerts: follow them or forward them")
    cmds = p.add_subparsers(dest="alerts_command", metavar="ACTION")
    cmds.required = True
    tail = cmds.add_parser("tail", help="print alert events as they come")
    tail.add_argument("--from-beginning", action="store_true", help="every retained event")
    tail.add_argument("--json", action="store_true", help="one JSON event per line")
    tail.add_argument("--count", type=int, help="exit after this many events")
    tail.add_argument("--timeout", type=float, help="exit after this many seconds")
    tail.set_defaults(func=_tail)
    fwd = cmds.add_parser(
        "forward", help="POST each event to a webhook (signed, retried, at least once)"
    )
    fwd.add_argument("--webhook", required=True, help="the receiver's http(s) URL")
    fwd.add_argument("--timeout", type=float, help="exit after this many seconds")
    fwd.set_defaults(func=_forward)


def _tail(args: argparse.Namespace) -> int:
    from quotaflow._kafka import consumer as kafka_consumer
    from quotaflow._kafka import kafka_errors

    s = load_settings()
    consumer = kafka_consumer(
        s.kafka.confluent_config(),
        f"quotaflow-alerts-tail-{uuid.uuid4().hex[:8]}",  # its own: tails never share events
        auto_offset_reset="earliest" if args.from_beginning else "latest",
    )
    with kafka_errors(f"following {s.topics.alerts!r}", s.kafka.bootstrap_servers):
        consumer.subscribe([s.topics.alerts])
    seen = 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        while args.count is None or seen < args.count:
            if deadline is not None and time.monotonic() >= deadline:
                break
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            try:
                event = json.loads(msg.value())
            except ValueError:
                continue
            seen += 1
            if args.json:
                print(json.dumps(event), flush=True)
            else:
                print(
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(event.get('time', 0)))} "
                    f"{event.get('key')} {event.get('limit')}: {event.get('used')} of "
                    f"{event.get('limit_value')} crossed {event.get('threshold'):g} "
                    f"(policy {event.get('policy')}, id {event.get('id')})",
                    flush=True,
                )
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def _forward(args: argparse.Namespace) -> int:
    from quotaflow_stream.webhook import AlertForwarder, WebhookSender

    s = load_settings()
    secret = s.alerts.webhook_secret
    forwarder: AlertForwarder | None = None

    def stop(*_: Any) -> None:
        if forwarder is not None:
            forwarder.stopped = True

    sender = WebhookSender(
        args.webhook,
        secret.get_secret_value().encode() if secret is not None else None,
        timeout=s.alerts.webhook_timeout,
        max_backoff=s.alerts.max_backoff,
        should_stop=lambda: forwarder is not None and forwarder.stopped,
    )
    forwarder = AlertForwarder(s, sender)
    signal.signal(signal.SIGTERM, stop)
    if secret is None:
        print("quotaflow: warning: QUOTAFLOW_ALERTS__WEBHOOK_SECRET is not set: POSTs are "
              "unsigned", file=sys.stderr)  # fmt: skip
    deadline = time.monotonic() + args.timeout if args.timeout else None
    with contextlib.suppress(KeyboardInterrupt):
        forwarder.run(until=lambda: deadline is not None and time.monotonic() >= deadline)
    print(f"alerts forward: {forwarder.delivered} delivered, {forwarder.repeats} repeats "
          f"dropped, {forwarder.refused} refused", file=sys.stderr)  # fmt: skip
    return 0
