"""Quota enforcement for the official ``openai`` client, through its HTTP transport.

    from openai import OpenAI
    from quotaflow.integrations.openai import instrument, retry_after

    client = instrument(OpenAI(), quota=quota_client, key="team-alpha")
    try:
        client.chat.completions.create(model="gpt-4o", messages=[...])
    except openai.RateLimitError as err:
        wait = retry_after(err)

``instrument`` returns a copy of the client whose HTTP client meters chat completions,
completions, embeddings, ``responses.create`` (streamed or not) and ``images.generate`` /
``images.edit``: a call over its limit raises the client's own ``RateLimitError`` before any
HTTP request, and every call's usage (tokens, cache and reasoning parts, images) is recorded as
the provider reported it (see :mod:`quotaflow.integrations._transport`). Works for ``OpenAI``
and ``AsyncOpenAI``, streaming or not; no monkeypatching.
"""

from __future__ import annotations

from typing import Any

import openai

from quotaflow._exceptions import QuotaExceeded
from quotaflow.client import QuotaClient
from quotaflow.integrations._transport import KeyFn, Meter, metering_http_client, retry_after

__all__ = ["instrument", "retry_after"]


def instrument(client: Any, *, quota: QuotaClient, key: str | KeyFn, transport: Any = None) -> Any:
    """A copy of ``client`` (``OpenAI`` or ``AsyncOpenAI``) that enforces and records quota.

    ``key`` is the counter key, or a function of the request body that returns it. ``transport``
    is the inner HTTP transport (default: a plain one).
    """
    meter = Meter(quota, key, _denial)
    is_async = isinstance(client, openai.AsyncOpenAI)
    return client.with_options(http_client=metering_http_client(openai, is_async, meter, transport))


def _denial(exc: QuotaExceeded) -> dict[str, Any]:
    """OpenAI's 429 body: ``insufficient_quota`` for a spent budget, else a rate limit."""
    d = exc.decision
    if d is not None and d.by_budget:
        message = f"You exceeded your budget (quotaflow): {d.explain()}."
        return {"error": {"message": message, "type": "insufficient_quota", "param": None,
                          "code": "insufficient_quota"}}  # fmt: skip
    kind = "requests" if exc.limit and "requests" in exc.limit else "tokens"
    return {"error": {"message": f"Rate limit reached (quotaflow): {exc}", "type": kind,
                      "param": None, "code": "rate_limit_exceeded"}}  # fmt: skip
