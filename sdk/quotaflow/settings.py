"""One typed settings tree for every quotaflow component.

Values come, highest priority first, from constructor arguments, ``QUOTAFLOW_*`` environment
variables (nested with ``__``: ``QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS``), a ``.env`` file, and last
the endpoints recorded by ``quotaflow dev up`` so that local commands find the embedded stack.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from quotaflow._exceptions import ConfigError
from quotaflow.record import describe_validation_error

DEV_STATE_ENV = "QUOTAFLOW_DEV_STATE"
DEFAULT_DEV_STATE = Path(".quotaflow") / "dev.json"


def dev_state_path() -> Path:
    """Where ``quotaflow dev up`` records what runs where."""
    return Path(os.environ.get(DEV_STATE_ENV, str(DEFAULT_DEV_STATE)))


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    #: Extra librdkafka properties passed through unchanged (``{"socket.timeout.ms": "5000"}``).
    client_options: dict[str, str] = Field(default_factory=dict)

    def confluent_config(self) -> dict[str, Any]:
        """Properties for confluent-kafka clients (producer, consumer, admin)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_cafile:
            conf["ssl.ca.location"] = str(self.ssl_cafile)
        if self.ssl_certfile:
            conf["ssl.certificate.location"] = str(self.ssl_certfile)
        if self.ssl_keyfile:
            conf["ssl.key.location"] = str(self.ssl_keyfile)
        conf.update(self.client_options)
        return conf


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    password: SecretStr | None = None
    ssl_ca_certs: Path | None = None
    #: Prefix of every Redis key quotaflow writes.
    key_prefix: str = "quotaflow"
    socket_timeout: float = 2.0

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis.from_url(self.url, **kwargs)``."""
        kwargs: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_timeout,
        }
        if self.password is not None:
            kwargs["password"] = self.password.get_secret_value()
        if self.ssl_ca_certs is not None:
            kwargs["ssl_ca_certs"] = str(self.ssl_ca_certs)
        return kwargs

    @property
    def states_hash(self) -> str:
        """The hash that holds the latest quota state of every key (the snapshot)."""
        return f"{self.key_prefix}:states"

    @property
    def policies_key(self) -> str:
        """The live policy version in force, as workers last adopted it (start-up without the
        broker: the topic, else this, else the policy file)."""
        return f"{self.key_prefix}:policies"


class TopicSettings(BaseModel):
    usage: str = "quotaflow.usage"
    decisions: str = "quotaflow.decisions"
    dlq: str = "quotaflow.usage.dlq"
    #: Soft-budget alerts (one event per threshold per period); long retention.
    alerts: str = "quotaflow.alerts"
    #: The live policy document, versioned (compacted; every version kept under its own key).
    policies: str = "quotaflow.policies"
    partitions: int = Field(default=8, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    #: The audit trail is kept long; -1 keeps it forever.
    usage_retention_ms: int = 90 * 24 * 3600 * 1000


class WorkerSettings(BaseModel):
    app_id: str = "quotaflow"
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=0, le=65535)
    #: When set, the dashboard, API and metrics ask for ``Authorization: Bearer <token>``.
    api_token: SecretStr | None = None
    #: Writes of the admin API (policies, overrides) ask for this token, never the read
    #: token; unset, the admin API only reads.
    admin_token: SecretStr | None = None
    #: Seconds between two dashboard updates (server-sent events).
    dashboard_interval: float = Field(default=1.0, gt=0)

    def api_headers(self) -> dict[str, str]:
        """Headers a client of this worker's API sends (the bearer token, when one is set)."""
        token = self.api_token
        return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}

    data_dir: Path = Path(".quotaflow") / "worker"
    #: Event-time seconds a window keeps accepting late records after it ends.
    grace_seconds: float = Field(default=10.0, ge=0)
    #: Seconds a record id is remembered: a record with the same id within it counts once.
    dedup_horizon: float = Field(default=86400.0, gt=0)
    #: Seconds between heartbeats on the decisions topic (followers measure staleness by them).
    heartbeat_interval: float = Field(default=1.0, gt=0)
    #: Seconds between publications of the keys whose usage changed: a key's state goes out at
    #: most once per interval, however many messages touched it (usage that finds publication
    #: idle for an interval goes out as soon as it is folded).
    publish_interval: float = Field(default=0.01, gt=0)
    #: Seconds between saves of the changed aggregates to the table's changelog; a usage
    #: message is acked (and its offset committed) only after the save that covers it.
    save_interval: float = Field(default=2.0, gt=0)
    #: Save as soon as this many records are folded but unsaved (bounds redelivery work).
    save_every_records: int = Field(default=500_000, gt=0)
    #: An active key's state is re-published at least this often, even without new usage.
    refresh_interval: float = Field(default=5.0, gt=0)
    #: Seconds between Redis snapshot flushes.
    snapshot_interval: float = Field(default=0.25, gt=0)
    #: Keys with no usage for this long stop being refreshed.
    active_horizon: float = Field(default=120.0, gt=0)
    #: Longest a fetch waits at the broker for new usage; bounds decision latency when idle
    #: (Tansu answers an empty fetch when the wait ends: record -> state published p50 11.5
    #: ms at 20, 8.6-10.5 at 10, `bench propagation`). 10 ms was tried as the default, and
    #: Faust's recovery after a rebalance then stalled in 2 of 3 full test runs, so it stays 20.
    fetch_max_wait_ms: int = Field(default=20, ge=1, le=5000)
    #: Records whose event time is further ahead of the worker's clock go to the DLQ.
    max_future_skew: float = Field(default=300.0, gt=0)
    #: Seconds a stopping worker gives its final save (then Faust's own stop as long again);
    #: past them it exits non-zero, saying what it did not save. Nothing is lost: messages
    #: not saved were never committed, so the partitions' next owner reads them again.
    stop_timeout: float = Field(default=10.0, gt=0)


def _default_source() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ClientSettings(BaseModel):
    #: Identifies this instance in usage records (``source``); defaults to host-pid.
    source: str = Field(default_factory=_default_source)
    #: A record that finds the emitter idle is sent at once; records within this many seconds
    #: of a send wait for the next one and go together (one message per partition).
    flush_interval: float = Field(default=0.02, gt=0, description="Seconds between flushes.")
    max_batch: int = Field(default=500, ge=1, description="Records per message at most.")
    max_buffered: int = Field(default=1_000_000, ge=1, description="Records held in memory.")
    #: Local usage not acknowledged by a state is forgotten after this many seconds.
    pending_ttl: float = Field(default=120.0, gt=0)
    warm_start: bool = True
    #: Longest a decisions fetch waits at the broker. Tansu (the embedded broker) answers a
    #: fetch that found nothing only when this wait ends, so it bounds how late a state arrives
    #: (measured, 4 instances: state published -> applied p50 34-38 ms at 50, 16 ms at 5), at
    #: one fetch per interval per instance: 20 instances at 5 ms flooded it (p50 87 ms against
    #: 48), and at 20 ms they still lost more than they gained (102-109 ms against 76-86; a quiet
    #: 4-instance fleet's record -> every follower p99 falls from 50-67 to 39 ms at 20).
    #: Kafka answers as soon as a state arrives: there, raise it (500) to cut idle fetches.
    fetch_max_wait_ms: int = Field(default=50, ge=1, le=5000)
    #: Records past ``max_buffered`` (a long broker outage) go to an append-only journal in
    #: ``journal_dir/<source>`` and are replayed in order once the broker is back; a stable
    #: ``source`` lets a restarted process replay what its predecessor journaled.
    journal: bool = True
    journal_dir: Path = Path(".quotaflow") / "journal"
    journal_max_bytes: int = Field(default=1 << 30, ge=1 << 20)
    #: never | batch (fsync each batch written, every flush interval) | always (each record)
    journal_fsync: Literal["never", "batch", "always"] = "batch"
    #: A reservation not settled within this many seconds is settled as estimated.
    reservation_ttl: float = Field(default=600.0, gt=0)


KeySource = Literal["header", "organization", "api_key", "ip"]
#: The caller's credential, else its address: a caller cannot name its own counter key (and
#: so cannot take a fresh budget by sending another one). ``header`` and ``organization`` are
#: for a gateway behind a proxy that authenticates callers and sets them.
DEFAULT_KEY_SOURCES: tuple[KeySource, ...] = ("api_key", "ip")
#: The shipped HMAC salt: with it every installation derives the same key ids.
DEFAULT_KEY_SALT = "quotaflow-change-me"


class GatewaySettings(BaseModel):
    """The OpenAI-compatible metering gateway (``quotaflow gateway``)."""

    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8787, ge=0, le=65535)
    upstream: str = "https://api.openai.com"
    #: Where the counter key comes from, first match wins: the caller's API key turned into an
    #: HMAC id (``api_key``), the client address (``ip``), and, chosen by the caller and so only
    #: behind an authenticating proxy, the ``x-quotaflow-key`` header (``header``) or the
    #: ``OpenAI-Organization`` header (``organization``).
    key_sources: list[KeySource] = Field(default_factory=lambda: list(DEFAULT_KEY_SOURCES))
    key_header: str = "x-quotaflow-key"
    #: Salt of the HMAC that turns API keys into counter ids; keep it private and fleet-wide.
    key_salt: SecretStr = SecretStr(DEFAULT_KEY_SALT)
    #: Routes to other upstreams, by path prefix (the longest match wins; others go to
    #: ``upstream``): Anthropic's API lives elsewhere than OpenAI's. ``--upstream`` alone sends
    #: every route to one upstream.
    upstreams: dict[str, str] = Field(
        default_factory=lambda: {"/v1/messages": "https://api.anthropic.com"}
    )
    #: Replaces the caller's Authorization towards OpenAI-style upstreams when set.
    upstream_api_key: SecretStr | None = None
    #: Admit Anthropic calls by Anthropic's own prompt count (``/v1/messages/count_tokens``,
    #: one more upstream round trip) instead of the local estimate (its tokenizer is not
    #: public, so local counts are estimates).
    anthropic_count_tokens: bool = False
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    upstream_timeout: float = Field(default=600.0, gt=0)
    upstream_connect_timeout: float = Field(default=10.0, gt=0)
    #: ``estimate`` counts a model tiktoken does not know with the fallback encoding;
    #: ``reject`` answers 400 model_not_found.
    unknown_models: Literal["estimate", "reject"] = "estimate"
    #: Azure API Management style headers, added when a name is set.
    remaining_tokens_header: str | None = None
    consumed_tokens_header: str | None = None
    #: A Dev Proxy style JSON file replacing the 429 answer (``@dynamic`` = retry-after seconds).
    rate_limit_response_file: Path | None = None
    #: One log line per forwarded call (method, path, counter key, status, milliseconds). Off
    #: saves ~6 % of a gateway's CPU at thousands of calls a second (bench gateway); /metrics
    #: counts the calls either way.
    access_log: bool = True
    #: When set, ``/metrics`` asks for ``Authorization: Bearer <token>`` (it names no key, but
    #: shows traffic and policies to whoever can reach the gateway's port).
    metrics_token: SecretStr | None = None

    @property
    def default_salt(self) -> bool:
        """Whether key ids are derived with the shipped salt (the same in every installation)."""
        return self.key_salt.get_secret_value() == DEFAULT_KEY_SALT

    def salt_problem(self) -> str | None:
        """Why this gateway must not start as configured, or None: the shipped salt on an
        address beyond loopback would make its callers' key ids guessable elsewhere."""
        if not self.default_salt or is_loopback(self.listen_host):
            return None
        return (
            f"the gateway would listen on {self.listen_host} with the default HMAC salt, which "
            "gives every installation the same key ids; set QUOTAFLOW_GATEWAY__KEY_SALT to a "
            "long random secret (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )


class AlertSettings(BaseModel):
    """``quotaflow alerts forward``: where alert events are POSTed and how."""

    #: Signs each POST: ``X-Quotaflow-Signature: sha256=<HMAC-SHA256 of the body, hex>``.
    webhook_secret: SecretStr | None = None
    webhook_timeout: float = Field(default=10.0, gt=0)
    #: Retries back off from 0.5 s, doubling, to this many seconds between attempts.
    max_backoff: float = Field(default=30.0, gt=0)
    #: The forwarder's consumer group: offsets are committed after each delivered event.
    group_id: str = "quotaflow-alerts-forward"


class OtelSettings(BaseModel):
    """OpenTelemetry export (``pip install quotaflow[otel]``): usage as GenAI metrics from
    every QuotaClient, spans of the gateway's metered calls. Exporters are the process's own
    (``quotaflow gateway`` configures OTLP from the standard ``OTEL_EXPORTER_OTLP_*``)."""

    enabled: bool = False
    service_name: str = "quotaflow"


class PolicySettings(BaseModel):
    """Live policies (the policies topic): who may write them, and whether to follow them."""

    #: Signs every policy version written (HMAC-SHA256); when set, readers refuse unsigned or
    #: wrongly signed versions. Set the same secret on writers (CLI, worker) and readers.
    signing_key: SecretStr | None = None
    #: Follow the policies topic (False: the policy file only, as before live policies).
    follow: bool = True


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (an empty host or 0.0.0.0 is not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class QuotaflowSettings(BaseSettings):
    """The whole configuration; build with :func:`load_settings` for readable errors."""

    model_config = SettingsConfigDict(
        env_prefix="QUOTAFLOW_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        # an empty variable (a blank entry of an env file or a Secret) means unset: defaults,
        # and their checks (the gateway's salt), apply
        env_ignore_empty=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    policies: PolicySettings = Field(default_factory=PolicySettings)
    otel: OtelSettings = Field(default_factory=OtelSettings)
    policies_file: Path = Path("config") / "policies.yaml"
    #: Price overrides (negotiated prices, fine-tunes, self-hosted models) on top of
    #: genai-prices' data; a missing file means no overrides.
    prices_file: Path = Path("config") / "prices.yaml"

    def to_env(self) -> dict[str, str]:
        """These settings as ``QUOTAFLOW_*`` variables, to configure a child process alike."""
        env: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, BaseModel):
                for name in type(value).model_fields:
                    walk(f"{prefix}__{name.upper()}", getattr(value, name))
            elif value is None:
                return
            elif isinstance(value, SecretStr):
                env[prefix] = value.get_secret_value()
            elif isinstance(value, dict | list | tuple):
                env[prefix] = json.dumps(value)
            else:
                env[prefix] = str(value)

        for name in type(self).model_fields:
            walk(f"QUOTAFLOW_{name.upper()}", getattr(self, name))
        # An instance id names one process; a child must pick its own.
        env.pop("QUOTAFLOW_CLIENT__SOURCE", None)
        return env

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            DevStackSource(settings_cls),
            file_secret_settings,
        )


class DevStackSource(PydanticBaseSettingsSource):
    """Endpoints of a running ``quotaflow dev up`` stack, below the environment in priority."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover - __call__ does the work

    def __call__(self) -> dict[str, Any]:
        path = dev_state_path()
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return (
            {
                "kafka": {"bootstrap_servers": state.get("kafka_bootstrap")},
                "redis": {"url": state.get("redis_url")},
            }
            if state.get("kafka_bootstrap") and state.get("redis_url")
            else {}
        )


def load_settings(**overrides: Any) -> QuotaflowSettings:
    """Build settings; an invalid value raises :class:`ConfigError` naming the variable."""
    try:
        return QuotaflowSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(f"settings (QUOTAFLOW_*): {describe_validation_error(exc)}") from None
    except SettingsError as exc:  # a value the environment source could not even parse
        raise ConfigError(f"settings (QUOTAFLOW_*): {exc}") from None
