"""Build the Faust App from settings; nothing else lives here."""

from __future__ import annotations

import ssl
from typing import Any

import faust

from quotaflow.settings import QuotaflowSettings
from quotaflow_stream import transport


def broker_url(settings: QuotaflowSettings) -> str:
    hosts = [h.strip() for h in settings.kafka.bootstrap_servers.split(",") if h.strip()]
    # Our transport: Faust's aiokafka driver with a short fetch wait (see transport.py).
    return ";".join(f"quotaflow-kafka://{h}" for h in hosts)


def broker_credentials(settings: QuotaflowSettings) -> Any:
    """SASL/SSL settings mapped to Faust's credential objects (aiokafka underneath)."""
    k = settings.kafka
    context = None
    if k.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
        if k.ssl_certfile:
            context.load_cert_chain(str(k.ssl_certfile), str(k.ssl_keyfile or "") or None)
    if k.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=k.sasl_username,
            password=k.sasl_password.get_secret_value() if k.sasl_password else None,
            mechanism=k.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def build_app(settings: QuotaflowSettings) -> faust.App:
    w = settings.worker
    app = faust.App(
        w.app_id,
        broker=broker_url(settings),
        broker_credentials=broker_credentials(settings),
        # Tansu (the embedded broker) makes a group join wait ~23 s with Faust's default.
        broker_session_timeout=6,
        store="memory://",
        datadir=str(w.data_dir),
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=settings.topics.replication_factor,
        consumer_auto_offset_reset="earliest",
        web_enabled=True,
        web_bind=w.web_host,
        web_port=w.web_port,
        web_host=w.web_host,
        producer_linger_ms=5,
    )
    transport.set_fetch_max_wait(app, w.fetch_max_wait_ms)
    return app
