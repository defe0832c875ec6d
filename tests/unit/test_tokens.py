"""Counts against the figures OpenAI publishes in its cookbook, "How to count tokens with
tiktoken" (prompt tokens reported by the API for the same requests)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from quotaflow.tokens import (
    count_chat_prompt,
    count_inputs,
    count_request,
    count_text,
    ensure_tokenizer_data,
    max_output_tokens,
)

JARGON = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
WEATHER_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),
        ("gpt-3.5-turbo-0613", 129),
        ("gpt-3.5-turbo-0301", 127),
        ("gpt-4", 129),
        ("gpt-4-0613", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
        ("gpt-4o-2024-08-06", 124),
    ],
)
def test_chat_prompt_matches_the_cookbook(model: str, expected: int) -> None:
    count = count_chat_prompt(JARGON, model)
    assert count.tokens == expected and not count.estimated


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)],
)
def test_tool_definitions_match_the_cookbook(model: str, expected: int) -> None:
    assert count_chat_prompt(WEATHER_MESSAGES, model, tools=WEATHER_TOOLS).tokens == expected


def test_multipart_text_counts_like_the_joined_string() -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there, world."}]
    split = count_chat_prompt([{"role": "user", "content": parts}], "gpt-4o")
    assert split.tokens == 3 + 1 + count_text("Hello ", "gpt-4o") + count_text(
        "there, world.", "gpt-4o"
    ) + 3  # fmt: skip
    image = [{"type": "image_url", "image_url": {"url": "data:..."}}]
    assert count_chat_prompt([{"role": "user", "content": image}], "gpt-4o").estimated


def test_tool_calls_in_history_count_and_are_estimated() -> None:
    fn = {"name": "get_current_weather", "arguments": '{"location": "Paris"}'}
    call = {"id": "c1", "type": "function", "function": fn}
    with_call = count_chat_prompt(
        [{"role": "assistant", "content": None, "tool_calls": [call]}], "gpt-4o"
    )
    without = count_chat_prompt([{"role": "assistant", "content": None}], "gpt-4o")
    assert with_call.tokens > without.tokens and with_call.estimated


def test_unknown_model_falls_back_and_is_estimated(monkeypatch: pytest.MonkeyPatch) -> None:
    count = count_chat_prompt(JARGON, "my-local-llama")
    assert count.estimated and count.encoding == "o200k_base" and count.tokens == 124


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello world", 2),
        (["hello world", "hello"], 3),
        ([1, 2, 3, 4], 4),
        ([[1, 2], [3]], 3),
    ],
)
def test_completion_and_embedding_inputs(value: object, expected: int) -> None:
    assert count_inputs(value, "text-embedding-3-small").tokens == expected


def test_count_request_detects_the_kind_and_names_problems() -> None:
    assert count_request({"model": "gpt-4o", "messages": JARGON}).tokens == 124
    assert count_request({"model": "gpt-3.5-turbo-instruct", "prompt": "hello world"}).tokens == 2
    with pytest.raises(ValueError, match="model"):
        count_request({"messages": []})
    with pytest.raises(ValueError, match="none of"):
        count_request({"model": "gpt-4o"})


def test_max_output_tokens_prefers_the_new_field_and_multiplies_by_n() -> None:
    assert max_output_tokens({"max_tokens": 50}) == 50
    assert max_output_tokens({"max_completion_tokens": 20, "max_tokens": 50, "n": 2}) == 40
    assert max_output_tokens({}) is None


def test_rank_files_are_materialised_under_tiktokens_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    target = ensure_tokenizer_data(tmp_path)
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    data = (target / hashlib.sha1(url.encode()).hexdigest()).read_bytes()
    # the sha256 tiktoken itself expects for this file
    expected = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
    assert hashlib.sha256(data).hexdigest() == expected
