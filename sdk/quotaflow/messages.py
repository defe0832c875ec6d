"""Usage messages: how records travel on the usage topic.

A message holds one record (a JSON object) or several (a JSON array) whose counter keys all
hash to the message's partition. :func:`parse_usage_value` turns such a message into valid
records plus a rejection for each invalid part, so one bad record never costs the valid ones
beside it; :func:`encode_records` writes one. Decoding goes through msgspec's
:class:`~quotaflow.record.WireRecord` in one call; what it refuses is decided (and explained)
by the pydantic model, so both readings accept and refuse the same records.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from pydantic import ValidationError

from quotaflow.record import (
    RECORD_ADAPTER,
    REDACTED,
    SECRET_INITIALS,
    SECRET_LIKE,
    WireRecord,
    describe_validation_error,
    looks_like_secret,
)

#: Largest message value the worker accepts before parsing (bytes). Larger ones go to the DLQ.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_wire_decoder = msgspec.json.Decoder(WireRecord | list[WireRecord])


@dataclass(frozen=True, slots=True)
class Rejected:
    """A part of a usage message that is not a valid record, with the reason it was refused."""

    raw: bytes
    reason: str


def parse_usage_value(value: bytes | None) -> tuple[list[WireRecord], list[Rejected]]:
    """Split a usage message into valid records and rejections (never raises)."""
    if value is None:
        return [], [Rejected(b"", "empty message (null value)")]
    if len(value) > MAX_MESSAGE_BYTES:
        return [], [Rejected(value, f"message of {len(value)} bytes exceeds {MAX_MESSAGE_BYTES}")]
    try:  # the common case, every record plainly valid: one call into msgspec
        decoded = _wire_decoder.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError):
        pass
    else:
        records = decoded if isinstance(decoded, list) else [decoded]
        # the checks msgspec's constraints cannot state (the model's own validators), inline:
        # this runs for every record a worker reads
        secret_initials, secret_like, inf = SECRET_INITIALS, SECRET_LIKE.match, math.inf
        for r in records:
            if (
                not r.ts < inf
                or (r.key[0] in secret_initials and secret_like(r.key))
                or (r.user is not None and secret_like(r.user))
                or r.cached_prompt_tokens + r.cache_write_tokens > r.prompt_tokens
                or r.reasoning_tokens > r.completion_tokens
            ):
                break
        else:
            if records:
                return records, []
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        return [], [Rejected(value, f"not JSON: {exc}")]
    if isinstance(doc, dict):
        return _validate_one(doc, value, "")
    if isinstance(doc, list):
        if not doc:
            return [], [Rejected(value, "empty array: no records")]
        records = []
        rejected: list[Rejected] = []
        for index, item in enumerate(doc):
            raw = json.dumps(item, separators=(",", ":")).encode()
            good, bad = _validate_one(item, raw, f"[{index}]")
            records.extend(good)
            rejected.extend(bad)
        return records, rejected
    return [], [Rejected(value, f"expected a JSON object or array, got {type(doc).__name__}")]


def _validate_one(doc: Any, raw: bytes, prefix: str) -> tuple[list[WireRecord], list[Rejected]]:
    if not isinstance(doc, dict):
        return [], [Rejected(raw, f"{prefix or 'record'}: expected an object")]
    try:
        return [WireRecord.of(RECORD_ADAPTER.validate_python(doc))], []
    except ValidationError as exc:
        leaked = {f: REDACTED for f in ("key", "user")
                  if isinstance(doc.get(f), str) and looks_like_secret(doc[f])}  # fmt: skip
        if leaked:
            # Do not spread a leaked credential further: the dead letter keeps a redacted copy.
            raw = json.dumps({**doc, **leaked}, separators=(",", ":")).encode()
        return [], [Rejected(raw, describe_validation_error(exc, prefix))]


class Encodable(Protocol):
    """Anything that can go into a usage message: both record types."""

    @property
    def key(self) -> str: ...

    def to_json(self) -> bytes: ...


def encode_records(records: Sequence[Encodable]) -> bytes:
    """Encode records as one message value: an object for one record, an array for several."""
    if len(records) == 1:
        return records[0].to_json()
    return b"[" + b",".join(r.to_json() for r in records) + b"]"
