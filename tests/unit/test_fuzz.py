"""Bad input at every boundary, generated (hypothesis): usage messages, policy files and
command lines. Each case gets a clear error or a dead letter; nothing raises anything else."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from quotaflow._exceptions import ConfigError
from quotaflow.cli import build_parser
from quotaflow.messages import MAX_MESSAGE_BYTES, _wire_decoder, parse_usage_value
from quotaflow.policies import load_policies, parse_policies
from quotaflow.record import UsageRecord, WireRecord, looks_like_secret

VALID = {"id": "r1", "ts": 1.7e9, "key": "k", "model": "m", "source": "s", "prompt_tokens": 3}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# a valid record with one field replaced by something arbitrary (wrong types, negative or huge
# numbers, NaN, nested junk)
mutated = st.builds(
    lambda field, value: {**VALID, field: value},
    st.sampled_from([*sorted(VALID), "requests", "completion_tokens", "status", "attrs", "x"]),
    json_values | st.integers(min_value=-(10**30), max_value=10**30),
)


@given(st.binary(max_size=300))
def test_random_bytes_never_raise(raw: bytes) -> None:
    records, rejected = parse_usage_value(raw)
    assert records or rejected
    for bad in rejected:
        assert bad.reason


@given(mutated)
def test_a_broken_field_goes_to_the_dlq_naming_it(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    records, rejected = parse_usage_value(raw)
    if rejected:
        assert len(rejected) == 1 and rejected[0].reason
    else:  # the change was valid: it parsed as the record it describes
        (r,) = records
        assert r.id == str(doc["id"]) and math.isfinite(r.ts) and r.prompt_tokens >= 0


@given(st.lists(st.one_of(mutated, st.just(VALID)), min_size=1, max_size=8))
def test_valid_records_survive_their_bad_neighbours(docs: list[dict[str, Any]]) -> None:
    records, rejected = parse_usage_value(json.dumps(docs).encode())
    assert len(records) + len(rejected) == len(docs)
    assert sum(1 for d in docs if d == VALID) <= len(records)
    for bad in rejected:
        assert bad.reason.startswith("[")  # names the element: "[3].prompt_tokens: ..."


@settings(max_examples=400)
@given(st.one_of(mutated, st.lists(st.one_of(mutated, st.just(VALID)), min_size=1, max_size=4)))
def test_the_fast_decoder_agrees_with_the_model(doc: Any) -> None:
    """msgspec decodes the busy path; pydantic is the schema. Whatever the fast path accepts,
    the model accepts with the same values, and a message either refuses comes out the same."""
    raw = json.dumps(doc).encode()
    records, rejected = parse_usage_value(raw)
    docs = doc if isinstance(doc, list) else [doc]
    by_model = []
    for d in docs:
        with contextlib.suppress(ValidationError):
            by_model.append(WireRecord.of(UsageRecord.model_validate(d)))
    assert records == by_model
    assert len(rejected) == len(docs) - len(by_model)
    try:
        fast = _wire_decoder.decode(raw)
    except msgspec.DecodeError:  # (ValidationError is one) refused: the model decided above
        return
    for r in fast if isinstance(fast, list) else [fast]:
        if math.isfinite(r.ts) and not looks_like_secret(r.key):
            assert WireRecord.of(UsageRecord.model_validate(msgspec.to_builtins(r))) == r


def test_oversized_and_non_utf8_messages() -> None:
    records, rejected = parse_usage_value(b"[" + b" " * MAX_MESSAGE_BYTES + b"]")
    assert not records and "exceeds" in rejected[0].reason
    records, rejected = parse_usage_value(b'{"id": "\xff\xfe", "key": "\xc3"}')
    assert not records and rejected[0].reason.startswith("not JSON")


policy_docs = st.recursive(
    st.none() | st.integers(min_value=-5, max_value=10**6) | st.text(max_size=10) | st.booleans(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "version",
                    "policies",
                    "name",
                    "keys",
                    "limits",
                    "models",
                    "default",
                    "fail_mode",
                    "requests_per_minute",
                    "tokens_per_day",
                    "max_staleness",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=15,
)


@given(policy_docs)
def test_any_policy_document_is_a_policy_set_or_a_config_error(doc: Any) -> None:
    try:
        parse_policies(doc, source="fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(st.text(max_size=200))
def test_any_policy_file_text_loads_or_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_policies(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path))


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xff\xfe policies")
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policies(path)


def test_a_policy_file_cannot_construct_objects(tmp_path: Path) -> None:
    """Safe loading: a tag that would call a function under an unsafe loader is refused."""
    marker = tmp_path / "constructed"
    path = tmp_path / "p.yaml"
    path.write_text(
        f"version: 1\npolicies:\n  - !!python/object/apply:os.system ['touch {marker}']\n"
    )
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policies(path)
    assert not marker.exists()


COMMANDS = ["tokens", "policies", "schema", "key-id", "audit", "replay", "simulate", "doctor",
            "topics", "bench", "demo", "gateway", "worker", "dev"]  # fmt: skip


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(COMMANDS), st.lists(st.text(max_size=12), max_size=4))
def test_command_lines_parse_or_fail_with_usage(
    capsys: pytest.CaptureFixture[str], command: str, args: list[str]
) -> None:
    """Random arguments either parse or exit 2 with a usage error naming the problem (parsed
    only: a command line that parses is not run)."""
    try:
        build_parser().parse_args([command, *args])
    except SystemExit as exc:
        out = capsys.readouterr()
        if exc.code == 0:  # the arguments held a help flag (or an abbreviation of one)
            assert out.out.startswith("usage:")
        else:
            assert exc.code == 2 and "error:" in out.err and "Traceback" not in out.err


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o", "messages": [None]},
        {"model": "gpt-4o", "messages": [{"role": "user", "tool_calls": [1]}]},
        {"model": "gpt-4o", "messages": [{"role": "user", "tool_calls": [{"function": 3}]}]},
        {"model": "gpt-4o", "messages": [], "tools": [1]},
    ],
)
def test_malformed_chat_requests_are_value_errors(body: dict[str, Any]) -> None:
    """Found by fuzzing the gateway: such bodies once raised AttributeError (a 500)."""
    from quotaflow.tokens import count_request, max_output_tokens

    with pytest.raises(ValueError):
        count_request(body)
    assert max_output_tokens({"max_tokens": 10, "n": "many"}) == 10
