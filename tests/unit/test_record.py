import json

import pytest
from pydantic import ValidationError

from quotaflow.messages import MAX_MESSAGE_BYTES, encode_records, parse_usage_value
from quotaflow.record import UsageRecord, WireRecord


def rec(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "id": "r1",
        "ts": 1_700_000_000.5,
        "key": "team-alpha",
        "model": "gpt-4o",
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "source": "svc-1",
    }
    doc.update(over)
    return doc


def test_defaults_and_total() -> None:
    r = UsageRecord.model_validate(rec())
    assert r.requests == 1 and r.status == "ok" and r.estimated is False
    assert r.total_tokens == 120


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("prompt_tokens", -1, "prompt_tokens"),
        ("completion_tokens", 10**12, "completion_tokens"),
        ("ts", float("nan"), "ts"),
        ("key", "sk-live-abcdef", "raw API secret"),
        ("key", "", "key"),
        ("status", "maybe", "status"),
        ("requests", "many", "requests"),
    ],
)
def test_invalid_fields_are_named(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValidationError) as err:
        UsageRecord.model_validate(rec(**{field: value}))
    assert fragment in str(err.value)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError):
        UsageRecord.model_validate(rec(api_key="oops"))


def test_records_are_immutable() -> None:
    r = UsageRecord.model_validate(rec())
    with pytest.raises(ValidationError):
        r.prompt_tokens = 5  # type: ignore[misc]


def test_parse_single_object() -> None:
    records, rejected = parse_usage_value(json.dumps(rec()).encode())
    assert [r.id for r in records] == ["r1"] and rejected == []


def test_parse_array_keeps_valid_records_beside_a_bad_one() -> None:
    value = json.dumps([rec(id="a"), rec(id="b", prompt_tokens=-5), rec(id="c")]).encode()
    records, rejected = parse_usage_value(value)
    assert [r.id for r in records] == ["a", "c"]
    assert len(rejected) == 1
    assert rejected[0].reason.startswith("[1].prompt_tokens:")
    assert json.loads(rejected[0].raw)["id"] == "b"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b"\xff\xfe garbage", "not JSON"),
        (b"{not json", "not JSON"),
        (b"42", "expected a JSON object or array"),
        (b"[]", "empty array"),
        (b"[1]", "expected an object"),
        (None, "null value"),
    ],
)
def test_parse_rejects_with_reason(value: bytes | None, fragment: str) -> None:
    records, rejected = parse_usage_value(value)
    assert records == []
    assert len(rejected) == 1 and fragment in rejected[0].reason


def test_parse_rejects_oversized_message_without_parsing() -> None:
    value = b"[" + b" " * MAX_MESSAGE_BYTES + b"]"
    records, rejected = parse_usage_value(value)
    assert records == [] and "exceeds" in rejected[0].reason


def test_encode_round_trips() -> None:
    many = [UsageRecord.model_validate(rec(id=str(i))) for i in range(3)]
    wire = [WireRecord.of(r) for r in many]
    assert parse_usage_value(encode_records(many))[0] == wire
    assert parse_usage_value(encode_records(many[:1]))[0] == wire[:1]
    assert parse_usage_value(encode_records(wire))[0] == wire
    assert encode_records(many[:1]).startswith(b"{")


def test_a_secret_looking_key_is_redacted_in_the_rejection() -> None:
    secret = "sk-proj-" + "x" * 40
    records, rejected = parse_usage_value(json.dumps(rec(key=secret)).encode())
    assert records == [] and "raw API secret" in rejected[0].reason
    assert secret.encode() not in rejected[0].raw
    assert json.loads(rejected[0].raw)["id"] == "r1", "the rest of the record is kept"
    records, rejected = parse_usage_value(json.dumps(rec(user=secret)).encode())
    assert records == [] and secret.encode() not in rejected[0].raw, "an end user's too"


def fast(**over: object) -> object:
    from quotaflow.record import make_record

    doc: dict[str, object] = {
        "id": "r1", "ts": 1_700_000_000.5, "key": "team-alpha", "model": "gpt-4o",
        "requests": 1, "prompt_tokens": 100, "completion_tokens": 20, "estimated": False,
        "status": "ok", "source": "svc-1", "attrs": {"route": "/chat"},
    }  # fmt: skip
    doc.update(over)
    return make_record(**doc)  # type: ignore[arg-type]


def test_fast_record_encodes_exactly_like_the_model() -> None:
    from quotaflow.record import RecordedUsage

    r = fast()
    assert isinstance(r, RecordedUsage) and r.total_tokens == 120
    model = r.validated()
    assert json.loads(r.to_json()) == json.loads(model.to_json())
    assert parse_usage_value(r.to_json())[0] == [WireRecord.of(model)]
    v2 = fast(cached_prompt_tokens=40, reasoning_tokens=5, cost_micros=123, provider="openai")
    assert json.loads(v2.to_json()) == json.loads(v2.validated().to_json())
    assert parse_usage_value(v2.to_json())[0] == [WireRecord.of(v2.validated())]


def test_fields_at_their_defaults_are_left_out_of_the_json() -> None:
    """Small messages; every reader fills the defaults back (the schema states them)."""
    doc = json.loads(fast(attrs={}).to_json())
    assert set(doc) == {"id", "ts", "key", "model", "prompt_tokens", "completion_tokens", "source"}
    assert parse_usage_value(fast(attrs={}).to_json())[0] == [
        WireRecord.of(fast(attrs={}).validated())
    ]
    doc = json.loads(fast(images=2, cost_micros=0).to_json())
    assert doc["images"] == 2 and doc["cost_micros"] == 0, "a free call says it cost 0"
    schema = UsageRecord.model_json_schema()["properties"]
    omitted = {"requests", "estimated", "status", "attrs", "cached_prompt_tokens", "images",
               "cost_micros", "provider", "price_version", "user"}  # fmt: skip
    assert all("default" in schema[name] for name in omitted)


def test_a_v1_record_is_a_v2_record_with_zeros() -> None:
    v1 = rec()
    [record], rejected = parse_usage_value(json.dumps(v1).encode())
    assert rejected == []
    assert (record.cached_prompt_tokens, record.cache_write_tokens, record.reasoning_tokens) == (
        0, 0, 0,
    )  # fmt: skip
    assert record.images == 0 and record.cost_micros is None and record.price_version is None


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"prompt_tokens": 10, "cached_prompt_tokens": 8, "cache_write_tokens": 3}, "exceed"),
        ({"completion_tokens": 10, "reasoning_tokens": 11}, "reasoning_tokens exceed"),
        ({"cost_micros": -1}, "cost_micros"),
        ({"cost_micros": 10**13}, "cost_micros"),
        ({"images": -2}, "images"),
        ({"provider": ""}, "provider"),
        ({"user": "sk-live-" + "u" * 20}, "raw API secret"),
    ],
)
def test_v2_parts_never_exceed_their_wholes(over: dict[str, object], fragment: str) -> None:
    """Both readings refuse it: the worker's fast decode and the SDK's fast check."""
    records, rejected = parse_usage_value(json.dumps(rec(**over)).encode())
    assert records == [] and fragment in rejected[0].reason
    with pytest.raises(ValidationError) as err:
        fast(**over)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("prompt_tokens", -1, "prompt_tokens"),
        ("requests", 10**7, "requests"),
        ("key", "sk-live-abc", "raw API secret"),
        ("model", "", "model"),
        ("status", "maybe", "status"),
        ("ts", float("inf"), "ts"),
        ("attrs", {"k": "v" * 200}, "attrs"),
    ],
)
def test_fast_record_refuses_what_the_model_refuses(
    field: str, value: object, fragment: str
) -> None:
    with pytest.raises(ValidationError) as err:
        fast(**{field: value})
    assert fragment in str(err.value)


def test_fast_record_accepts_what_the_model_coerces() -> None:
    r = fast(prompt_tokens=5.0, ts=1_700_000_000)
    assert r.prompt_tokens == 5 and type(r.prompt_tokens) is int  # type: ignore[attr-defined]
