"""quotaflow's exceptions.

The tree::

    QuotaflowError
    ├── ConfigError                 settings or policy file invalid (names file, path and field)
    ├── RecordError                 a usage record that fails the v2 contract
    ├── UnpricedModel               no price for a model (lists the nearest known names)
    ├── ClientStateError            a QuotaClient used after close
    ├── QuotaExceeded               raised by integrations that turn a denial into an exception
    └── BrokerError                 Kafka failed the call (librdkafka's errors, translated)
        ├── BrokerUnavailable       the bootstrap servers cannot be reached (names them, the fix)
        ├── TransportFull           the producer's local queue is full: retry later
        └── DeliveryFailed          the broker refused messages, or was away past their timeout

librdkafka's own exceptions never escape quotaflow's API: :func:`quotaflow._kafka.kafka_errors`
translates them where quotaflow calls confluent-kafka.

Every error carries enough text to act on without reading the source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quotaflow.decision import Decision


class QuotaflowError(Exception):
    """Base class of every error quotaflow raises on purpose."""


class ConfigError(QuotaflowError):
    """Settings or a policy file is invalid; the message names where and what."""


class RecordError(QuotaflowError, ValueError):
    """A usage record does not satisfy the v2 contract."""


class ClientStateError(QuotaflowError, RuntimeError):
    """The client is not in a state that allows the call (for example, already closed)."""


class QuotaExceeded(QuotaflowError):
    """A call was denied by a quota; ``retry_after`` says how long to wait (seconds)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        limit: str | None = None,
        decision: Decision | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.limit = limit
        self.decision = decision


class BrokerError(QuotaflowError):
    """Kafka failed the call; the message says which operation and which broker."""


class BrokerUnavailable(BrokerError, ConnectionError):
    """The bootstrap servers did not answer; the message names them and how to fix it."""


class TransportFull(BrokerError):
    """The transport cannot take more right now (its local queue is full); retry later."""


class DeliveryFailed(BrokerError):
    """Some messages were not delivered (the broker refused them or was away too long)."""


class UnpricedModel(QuotaflowError, LookupError):
    """No price is known for a model; ``nearest`` lists the closest known model names."""

    def __init__(self, model: str, provider: str | None, nearest: list[str]) -> None:
        where = f" from provider {provider!r}" if provider else ""
        hint = f"; nearest known: {', '.join(nearest)}" if nearest else ""
        super().__init__(
            f"no price for model {model!r}{where} in genai-prices or prices.yaml{hint}"
        )
        self.model = model
        self.provider = provider
        self.nearest = nearest
