"""The APIs the gateway meters, and how each speaks: its routes, how its body is read, where its
usage is, its error shape and its rate-limit headers.

- OpenAI chat, completions, embeddings (``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/embeddings``): usage from ``usage`` or the stream's last chunk;
- OpenAI Responses (``/v1/responses``): ``usage``, or the ``response.completed`` event;
- OpenAI images (``/v1/images/generations``, ``/v1/images/edits``, a multipart upload):
  images from ``data``, tokens from ``usage`` for token-priced models;
- Anthropic Messages (``/v1/messages``): ``usage``, or ``message_start`` plus the last
  ``message_delta``. Its answers are Anthropic's: errors, ``anthropic-ratelimit-*`` headers.

OpenAI routes answer errors in OpenAI's shape and carry ``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from quotaflow.cache import LimitUsage
from quotaflow_producers.gateway.responses import openai_error, pick_limit, ratelimit_headers

Dialect = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class MeteredApi:
    path: str
    #: The request kind its body is counted as (quotaflow.tokens.count_request).
    kind: str
    dialect: Dialect
    #: ``multipart`` for uploads (image edits): fields are read from the form.
    body: Literal["json", "multipart"] = "json"
    #: The provider whose usage shape the answers have (Anthropic's differs from OpenAI's).
    provider: str | None = None

    @property
    def images(self) -> bool:
        return self.kind == "images"


APIS = {
    api.path: api
    for api in (
        MeteredApi("/v1/chat/completions", "chat", "openai"),
        MeteredApi("/v1/completions", "completion", "openai"),
        MeteredApi("/v1/embeddings", "embedding", "openai"),
        MeteredApi("/v1/responses", "responses", "openai"),
        MeteredApi("/v1/images/generations", "images", "openai"),
        MeteredApi("/v1/images/edits", "images", "openai", body="multipart"),
        MeteredApi("/v1/messages", "messages", "anthropic", provider="anthropic"),
    )
}
#: OpenAI's default image model, when a request names none.
DEFAULT_IMAGE_MODEL = "dall-e-2"


def dialect_of(path: str) -> Dialect:
    """Which API's shapes a path's answers take (Anthropic's under /v1/messages)."""
    return "anthropic" if path == "/v1/messages" or path.startswith("/v1/messages/") else "openai"


def read_body(api: MeteredApi, raw: bytes, content_type: str) -> dict[str, Any]:
    """The request's fields; ValueError naming what is wrong."""
    if api.body == "multipart":
        return _form_fields(raw, content_type)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    return body


def _form_fields(raw: bytes, content_type: str) -> dict[str, Any]:
    """The text fields of a multipart/form-data body (files are counted, not read)."""
    if (
        not content_type.lower().startswith("multipart/form-data")
        or "boundary=" not in content_type
    ):
        raise ValueError("The request body must be multipart/form-data with a boundary.")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw
    )
    if not message.is_multipart():
        raise ValueError("The multipart body could not be parsed.")
    fields: dict[str, Any] = {}
    files = 0
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        if part.get_filename() is not None:
            files += 1
            continue
        payload = part.get_payload(decode=True)
        fields[name] = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    fields["_files"] = files
    return fields


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
