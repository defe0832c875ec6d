"""The LLM APIs quotaflow meters, and how each is read: its route, how its body is read, what
the body is counted as, and which provider's usage shape its answers have. The gateway and the
client integrations share this table (the gateway adds each API's answers: errors, headers).

- OpenAI chat, completions, embeddings (``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/embeddings``): usage from ``usage`` or the stream's last chunk;
- OpenAI Responses (``/v1/responses``): ``usage``, or the ``response.completed`` event;
- OpenAI images (``/v1/images/generations``, ``/v1/images/edits``, a multipart upload):
  images from ``data``, tokens from ``usage`` for token-priced models;
- Anthropic Messages (``/v1/messages``): ``usage``, or ``message_start`` plus the last
  ``message_delta``.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from dataclasses import dataclass
from typing import Any, Literal

from quotaflow.record import RecordedUsage
from quotaflow.reservation import Reservation

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


#: Each route's path below the API version, longest first ("/chat/completions" before
#: "/completions"): clients put "/v1" in their base URL or in the path.
_TAILS = sorted(((route.removeprefix("/v1"), api) for route, api in APIS.items()),
                key=lambda item: -len(item[0]))  # fmt: skip


def api_for(path: str) -> MeteredApi | None:
    """The metered API of a request path, whatever prefix its client's base URL adds."""
    for tail, api in _TAILS:
        if path.endswith(tail):
            return api
    return None


def settle_answer(reservation: Reservation, data: bytes, api: MeteredApi | None) -> RecordedUsage:
    """Settle a call from its JSON answer: its ``usage`` (every API names it so), and for image
    calls the images in ``data``; an answer that is not JSON settles on the estimates."""
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return reservation.settle()
    usage = answer.get("usage")
    if api is not None and api.images:
        generated = answer.get("data")
        images = len(generated) if isinstance(generated, list) else 0
        if usage is None:
            # per-image models (dall-e) report no tokens because they bill none
            return reservation.settle(prompt_tokens=0, completion_tokens=0, images=images,
                                      estimated=False)  # fmt: skip
        return reservation.settle(usage, images=images)
    return reservation.settle(usage)
