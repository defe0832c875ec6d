"""Usage record v2: one LLM call's consumption, the unit of the audit trail.

v2 adds what providers bill beyond prompt and completion tokens: ``cached_prompt_tokens`` and
``cache_write_tokens`` (both parts of ``prompt_tokens``), ``reasoning_tokens`` (part of
``completion_tokens``), ``images``, the call's price ``cost_micros`` (integer micro-dollars)
with the ``price_version`` of the table that priced it, the ``provider`` and the end ``user``.
Every v2 field has a default (0 or null), so a v1 record is a valid v2 record; one without
``cost_micros`` is priced by the worker. Fields at their defaults are left out of the JSON
(the schema states each default, and every reader fills them in).

How records travel on the usage topic (one a message, or many) is :mod:`quotaflow.messages`.

The pydantic model :class:`UsageRecord` is the schema (and its JSON Schema export) and what
explains a rejection. Decoding a busy topic goes through :class:`WireRecord`, a msgspec struct
with the same fields and constraints that decodes a message in one call at about a tenth of the
cost; whatever it refuses (or accepts only in pydantic's lax reading, like ``"12"`` for 12) is
decided by the model, so both readings accept and refuse the same records.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import msgspec
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from quotaflow.prices import ModelPrices

SCHEMA_VERSION = 2

# Raw provider secrets look like these; a counter key must be an id, never a credential.
SECRET_LIKE = re.compile(r"^(sk-|sk_|rk-|Bearer\s)", re.IGNORECASE)

#: What a secret-looking counter key is replaced with in dead letters.
REDACTED = "[redacted: looked like an API secret]"

_MAX_TOKENS = 10**9
_MAX_REQUESTS = 10**6
#: A million dollars, in micro-dollars: no single call costs more.
_MAX_COST_MICROS = 10**12

Status = Literal["ok", "error", "cancelled", "denied"]
Label = Annotated[str, Field(max_length=128)]


class UsageRecord(BaseModel):
    """One LLM call's usage (schema v2). Immutable; unknown fields are rejected."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="quotaflow usage record v2",
        json_schema_extra={"$id": "https://quotaflow.dev/schema/usage-record.v2.json"},
    )

    id: str = Field(min_length=1, max_length=128, description="Unique per LLM call; dedup key.")
    ts: float = Field(gt=0, description="Event time, epoch seconds (UTC).")
    key: str = Field(
        min_length=1, max_length=256, description="Counter key: an id, never a raw API secret."
    )
    model: str = Field(min_length=1, max_length=128)
    requests: int = Field(default=1, ge=0, le=_MAX_REQUESTS)
    prompt_tokens: int = Field(default=0, ge=0, le=_MAX_TOKENS)
    completion_tokens: int = Field(default=0, ge=0, le=_MAX_TOKENS)
    estimated: bool = Field(
        default=False, description="Tokens were counted locally, not reported by the provider."
    )
    status: Status = "ok"
    source: str = Field(min_length=1, max_length=128, description="Emitting instance id.")
    attrs: dict[str, Label] = Field(
        default_factory=dict, max_length=16, json_schema_extra={"default": {}}
    )
    # v2
    cached_prompt_tokens: int = Field(
        default=0,
        ge=0,
        le=_MAX_TOKENS,
        description="Prompt tokens read from a cache (within prompt_tokens).",
    )
    cache_write_tokens: int = Field(
        default=0,
        ge=0,
        le=_MAX_TOKENS,
        description="Prompt tokens written to a cache (within prompt_tokens).",
    )
    reasoning_tokens: int = Field(
        default=0, ge=0, le=_MAX_TOKENS, description="Reasoning tokens (within completion_tokens)."
    )
    images: int = Field(default=0, ge=0, le=_MAX_REQUESTS, description="Images generated.")
    cost_micros: int | None = Field(
        default=None,
        ge=0,
        le=_MAX_COST_MICROS,
        description="The call's price in integer micro-dollars; null: priced by the worker.",
    )
    provider: str | None = Field(default=None, min_length=1, max_length=64)
    price_version: str | None = Field(
        default=None, min_length=1, max_length=128, description="The price table that priced it."
    )
    user: str | None = Field(
        default=None, min_length=1, max_length=128, description="End user of the key: an id."
    )
    priced_as: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Whose prices made cost_micros when not the model's own: the model an "
        "unpriced call was estimated at, 'free' (its policy's `unpriced`), or an image call's "
        "price variant (model/quality/size).",
    )

    @field_validator("ts")
    @classmethod
    def _finite_ts(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of epoch seconds")
        return value

    @field_validator("key", "user")
    @classmethod
    def _not_a_secret(cls, value: str | None) -> str | None:
        if value is not None and SECRET_LIKE.match(value):
            raise ValueError(
                "looks like a raw API secret; use an id (quotaflow.key_id() derives one)"
            )
        return value

    @model_validator(mode="after")
    def _parts_within_wholes(self) -> UsageRecord:
        if self.cached_prompt_tokens + self.cache_write_tokens > self.prompt_tokens:
            raise ValueError(
                "cached_prompt_tokens + cache_write_tokens exceed prompt_tokens; both are "
                "counted within prompt_tokens (add Anthropic's cache tokens to input_tokens)"
            )
        if self.reasoning_tokens > self.completion_tokens:
            raise ValueError("reasoning_tokens exceed completion_tokens, which include them")
        return self

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> bytes:
        return _wire_encoder.encode(_Encoded(**self.model_dump()))


RECORD_ADAPTER: TypeAdapter[UsageRecord] = TypeAdapter(UsageRecord)

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=_MAX_TOKENS)]


class WireRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, gc=False):
    """A usage record as decoded from a usage message: :class:`UsageRecord`'s fields and
    constraints, in a msgspec struct (what the worker, audit and replay read)."""

    id: _Id
    ts: Annotated[float, msgspec.Meta(gt=0)]
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    model: _Id
    requests: Annotated[int, msgspec.Meta(ge=0, le=_MAX_REQUESTS)] = 1
    prompt_tokens: _Count = 0
    completion_tokens: _Count = 0
    estimated: bool = False
    status: Status = "ok"
    source: _Id
    attrs: Annotated[
        dict[str, Annotated[str, msgspec.Meta(max_length=128)]], msgspec.Meta(max_length=16)
    ] = {}
    cached_prompt_tokens: _Count = 0
    cache_write_tokens: _Count = 0
    reasoning_tokens: _Count = 0
    images: Annotated[int, msgspec.Meta(ge=0, le=_MAX_REQUESTS)] = 0
    cost_micros: Annotated[int, msgspec.Meta(ge=0, le=_MAX_COST_MICROS)] | None = None
    provider: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    price_version: _Id | None = None
    user: _Id | None = None
    priced_as: _Id | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> bytes:
        return _wire_encoder.encode(_Encoded(*msgspec.structs.astuple(self)))

    @classmethod
    def of(cls, record: UsageRecord) -> WireRecord:
        return cls(**record.model_dump())


_wire_encoder = msgspec.json.Encoder()

#: Columns ``quotaflow audit query|export`` adds beside the record's fields (derived from
#: them, so ``quotaflow replay`` of an export leaves them out).
EXPORT_ONLY_COLUMNS = ("time", "cost_usd", "priced_by")


_STATUSES = frozenset(("ok", "error", "cancelled", "denied"))
# first letters of what SECRET_LIKE matches: most keys are told apart without the regex
SECRET_INITIALS = frozenset("sSrRbB")


class RecordedUsage(NamedTuple):
    """A usage record as ``QuotaClient.record()`` queues it: the fields of
    :class:`UsageRecord`, already checked against the same constraints, in a named tuple.

    Building a pydantic model costs ~4 us and several objects per call; ``record()`` must stay
    within a few microseconds, so the request path checks the constraints directly (falling
    back to the model, and its precise error, whenever a value is not plainly valid).
    """

    id: str
    ts: float
    key: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    estimated: bool
    status: str
    source: str
    attrs: dict[str, str]
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    images: int = 0
    cost_micros: int | None = None
    provider: str | None = None
    price_version: str | None = None
    user: str | None = None
    priced_as: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> bytes:
        return _wire_encoder.encode(_Encoded(*self))

    def validated(self) -> UsageRecord:
        return RECORD_ADAPTER.validate_python(self._asdict())


def _encoding_struct() -> Any:
    """A struct of the record's fields in order (those of :class:`RecordedUsage`), for
    encoding only: with :class:`UsageRecord`'s defaults and ``omit_defaults``, fields at their
    defaults (``requests`` 1, counts 0, ``status`` ok, v2 fields 0 or null) are left out, which
    keeps messages small while every reader, v1 or v2, fills them back from the schema."""
    fields: list[Any] = []
    for name in RecordedUsage._fields:
        info = UsageRecord.model_fields[name]
        # a required field after optional ones needs a default too: UNSET, which no value
        # equals, so it is always written
        default = (
            msgspec.UNSET if info.is_required() else info.get_default(call_default_factory=True)
        )
        fields.append((name, Any, default))
    return msgspec.defstruct("EncodedRecord", fields, omit_defaults=True, gc=False)


_Encoded = _encoding_struct()


def make_record(
    id: str,
    ts: float,
    key: str,
    model: str,
    requests: int,
    prompt_tokens: int,
    completion_tokens: int,
    estimated: bool,
    status: str,
    source: str,
    attrs: dict[str, str],
    cached_prompt_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
    images: int = 0,
    cost_micros: int | None = None,
    provider: str | None = None,
    price_version: str | None = None,
    user: str | None = None,
    prices: ModelPrices | None = None,
    priced_as: str | None = None,
) -> RecordedUsage:
    """A checked record; raises pydantic's ``ValidationError`` naming the field otherwise.

    Given ``prices`` and no ``cost_micros``, the call is priced once its counts are known to
    be valid (the arithmetic never sees a bad value). A record neither given a cost nor priced
    has no ``price_version`` either.
    """
    if prices is None:
        if cost_micros is None:
            price_version = None
    elif cost_micros is not None:
        prices = None
    # checked inline (no helper calls): this is most of record()'s few microseconds
    if (
        type(id) is str
        and 0 < len(id) <= 128
        and (type(ts) is float or type(ts) is int)
        and 0 < ts < math.inf
        and type(key) is str
        and 0 < len(key) <= 256
        and not (key[0] in SECRET_INITIALS and SECRET_LIKE.match(key))
        and type(model) is str
        and 0 < len(model) <= 128
        and type(requests) is int
        and 0 <= requests <= _MAX_REQUESTS
        and type(prompt_tokens) is int
        and 0 <= prompt_tokens <= _MAX_TOKENS
        and type(completion_tokens) is int
        and 0 <= completion_tokens <= _MAX_TOKENS
        and type(estimated) is bool
        and status in _STATUSES
        and type(source) is str
        and 0 < len(source) <= 128
        and (
            not attrs
            or (
                len(attrs) <= 16
                and all(
                    type(k) is str and type(v) is str and len(v) <= 128 for k, v in attrs.items()
                )
            )
        )
        # v2: most calls have none of these; one test each when they are plainly absent
        and (
            (not cached_prompt_tokens and not cache_write_tokens)
            or (
                type(cached_prompt_tokens) is int
                and type(cache_write_tokens) is int
                and cached_prompt_tokens >= 0
                and cache_write_tokens >= 0
                and cached_prompt_tokens + cache_write_tokens <= prompt_tokens
            )
        )
        and (
            not reasoning_tokens
            or (type(reasoning_tokens) is int and 0 <= reasoning_tokens <= completion_tokens)
        )
        and (not images or (type(images) is int and 0 <= images <= _MAX_REQUESTS))
        and (
            cost_micros is None
            or (type(cost_micros) is int and 0 <= cost_micros <= _MAX_COST_MICROS)
        )
        and (provider is None or (type(provider) is str and 0 < len(provider) <= 64))
        and (
            price_version is None or (type(price_version) is str and 0 < len(price_version) <= 128)
        )
        and (
            user is None
            or (
                type(user) is str
                and 0 < len(user) <= 128
                and not (user[0] in SECRET_INITIALS and SECRET_LIKE.match(user))
            )
        )
        and (priced_as is None or (type(priced_as) is str and 0 < len(priced_as) <= 128))
    ):
        if prices is not None:
            cost_micros = prices.cost(
                prompt_tokens, completion_tokens, cached_prompt_tokens, cache_write_tokens,
                reasoning_tokens, images, requests,
            )  # fmt: skip
        return RecordedUsage(
            id, ts, key, model, requests, prompt_tokens, completion_tokens, estimated, status,
            source, attrs, cached_prompt_tokens, cache_write_tokens, reasoning_tokens, images,
            cost_micros, provider, price_version, user, priced_as,
        )  # fmt: skip
    checked = UsageRecord(
        id=id, ts=ts, key=key, model=model, requests=requests, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, estimated=estimated, status=status,
        source=source, attrs=attrs, cached_prompt_tokens=cached_prompt_tokens,
        cache_write_tokens=cache_write_tokens, reasoning_tokens=reasoning_tokens,
        images=images, cost_micros=cost_micros, provider=provider,
        price_version=price_version, user=user, priced_as=priced_as,
    )  # fmt: skip
    if prices is not None:
        checked = checked.model_copy(update={"cost_micros": prices.cost(
            checked.prompt_tokens, checked.completion_tokens, checked.cached_prompt_tokens,
            checked.cache_write_tokens, checked.reasoning_tokens, checked.images, checked.requests,
        )})  # fmt: skip
    return RecordedUsage(**checked.model_dump())


def looks_like_secret(text: str | bytes | None) -> bool:
    """Whether a key or id looks like a raw API credential (``sk-...``, ``Bearer ...``)."""
    if text is None:
        return False
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return SECRET_LIKE.match(text) is not None


def describe_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field path: ``[2].prompt_tokens: must be >= 0``."""
    parts = []
    for item in err.errors(include_url=False):
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"])
        path = (prefix + loc).lstrip(".") or "record"
        # Our own validators' messages read better without pydantic's "Value error, " prefix.
        msg = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{path}: {msg}")
    return "; ".join(parts)


def usage_record_json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`UsageRecord`, as checked in under ``config/schema/``."""
    return UsageRecord.model_json_schema()
