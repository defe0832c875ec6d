"""quotaflow's exceptions.

The tree::

    QuotaflowError
    ├── ConfigError                 settings or policy file invalid (names file, path and field)
    ├── RecordError                 a usage record that fails the v1 contract
    ├── ClientStateError            a QuotaClient used before open or after close
    └── QuotaExceeded               raised by integrations that turn a denial into an exception

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
    """A usage record does not satisfy the v1 contract."""


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
