"""What each metered API answers from the gateway: errors in its own shape, and its rate-limit
headers (OpenAI's ``x-ratelimit-*``, Anthropic's ``anthropic-ratelimit-*`` with RFC 3339 resets).
Which APIs are metered, and how their bodies are read, is :mod:`quotaflow.apis`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from quotaflow.apis import Dialect
from quotaflow.cache import LimitUsage
from quotaflow_producers.gateway.responses import openai_error, pick_limit, ratelimit_headers

# -- answers ------------------------------------------------------------------------------

_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
}  # fmt: skip


def anthropic_error(
    status: int, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """An error in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ANTHROPIC_TYPES.get(status, "api_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


def error(dialect: Dialect, status: int, message: str, **openai: Any) -> web.Response:
    """An error in the caller's API's own shape; ``openai`` are :func:`openai_error`'s fields
    (``type_``, ``code``, ``param``), and ``headers`` go with either."""
    if dialect == "anthropic":
        return anthropic_error(status, message, headers=openai.get("headers"))
    return openai_error(status, message, **openai)


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


#: Anthropic's header families and the units that answer them, in order of preference.
_ANTHROPIC_HEADERS = (
    ("requests", ("requests",)),
    ("tokens", ("tokens",)),
    ("input-tokens", ("uncached_prompt_tokens", "prompt_tokens")),
    ("output-tokens", ("completion_tokens",)),
)


def anthropic_headers(rows: tuple[LimitUsage, ...]) -> dict[str, str]:
    """``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,
    reset}`` from the key-wide minute limits that bind the call (reset as RFC 3339)."""
    headers: dict[str, str] = {}
    for family, units in _ANTHROPIC_HEADERS:
        row = pick_limit(rows, units)
        if row is None:
            continue
        prefix = f"anthropic-ratelimit-{family}"
        headers[f"{prefix}-limit"] = str(row.spec.limit)
        headers[f"{prefix}-remaining"] = str(row.remaining)
        headers[f"{prefix}-reset"] = _rfc3339(row.reset_at)
    return headers


def limit_headers(dialect: Dialect, rows: tuple[LimitUsage, ...], now: float) -> dict[str, str]:
    """The rate-limit headers of the caller's API (the budget headers with both)."""
    headers = ratelimit_headers(rows, now)
    if dialect == "anthropic":
        budget = {k: v for k, v in headers.items() if not k.startswith("x-ratelimit-")}
        return {**budget, **anthropic_headers(rows)}
    return headers
