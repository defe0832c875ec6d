"""Quota enforcement for the official ``anthropic`` client, through its HTTP transport.

    import anthropic
    from quotaflow.integrations.anthropic import instrument, retry_after

    client = instrument(anthropic.Anthropic(), quota=quota_client, key="team-alpha")
    try:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=512, messages=[...])
        with client.messages.stream(...) as stream: ...
    except anthropic.RateLimitError as err:
        wait = retry_after(err)

``instrument`` returns a copy of the client whose HTTP client meters ``messages.create``
(streamed or not) and ``messages.stream``: a call over its limit raises the client's own
``RateLimitError`` before any HTTP request (Anthropic's error shape, ``retry-after`` readable),
and every call's usage is recorded as Anthropic reported it: ``input_tokens`` plus the cache
reads and writes (which Anthropic reports apart), the output tokens, priced. Anthropic's
tokenizer is not public, so the admission's prompt count is an estimate, and the record says so
only if Anthropic did not report usage. Works for ``Anthropic`` and ``AsyncAnthropic``.
"""

from __future__ import annotations

from typing import Any

import anthropic

from quotaflow._exceptions import QuotaExceeded
from quotaflow.client import QuotaClient
from quotaflow.integrations._transport import KeyFn, Meter, metering_http_client, retry_after

__all__ = ["instrument", "retry_after"]


def instrument(client: Any, *, quota: QuotaClient, key: str | KeyFn, transport: Any = None) -> Any:
    """A copy of ``client`` (``Anthropic`` or ``AsyncAnthropic``) that enforces and records
    quota. ``key`` is the counter key, or a function of the request body that returns it."""
    meter = Meter(quota, key, _denial, provider="anthropic")
    is_async = isinstance(client, anthropic.AsyncAnthropic)
    return client.with_options(
        http_client=metering_http_client(anthropic, is_async, meter, transport)
    )


def _denial(exc: QuotaExceeded) -> dict[str, Any]:
    """Anthropic's 429 body (``rate_limit_error``; a spent budget says so in dollars)."""
    d = exc.decision
    message = (
        f"You exceeded your budget (quotaflow): {d.explain()}."
        if d is not None and d.by_budget
        else f"Rate limit reached (quotaflow): {exc}"
    )
    return {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
