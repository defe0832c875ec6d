"""Providers' documented usage shapes, read as the usage record counts them, and held to
genai-prices' own extractors (a second reading: a mix-up like LiteLLM #36168 fails both)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from genai_prices import calc_price, extract_usage

from quotaflow.billed import BilledUsage, billed_usage
from quotaflow.prices import PriceTable
from tests.support.prices import micros

# OpenAI Chat Completions: prompt_tokens includes the cached ones, completion the reasoning.
OPENAI_CHAT = {
    "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0},
}  # fmt: skip
# OpenAI Responses: the same, named input/output.
OPENAI_RESPONSES = {
    "input_tokens": 2006, "output_tokens": 300, "total_tokens": 2306,
    "input_tokens_details": {"cached_tokens": 1920},
    "output_tokens_details": {"reasoning_tokens": 128},
}  # fmt: skip
# Anthropic Messages: input_tokens EXCLUDES the cache reads and writes.
ANTHROPIC = {
    "input_tokens": 50, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 2000,
    "output_tokens": 300,
}  # fmt: skip


def test_openai_chat_counts_cached_and_reasoning_within_their_wholes() -> None:
    assert billed_usage(OPENAI_CHAT) == BilledUsage(2006, 300, 1920, 0, 128)


def test_openai_responses_reads_the_same_as_chat() -> None:
    assert billed_usage(OPENAI_RESPONSES) == billed_usage(OPENAI_CHAT)


def test_anthropic_adds_its_cache_reads_and_writes_into_the_prompt() -> None:
    assert billed_usage(ANTHROPIC) == BilledUsage(3050, 300, 2000, 1000, 0)
    # without cache fields, the provider settles the reading (they agree when nothing cached)
    plain = {"input_tokens": 10, "output_tokens": 5}
    assert billed_usage(plain, "anthropic") == billed_usage(plain) == BilledUsage(10, 5)


def test_client_objects_read_like_dicts() -> None:
    obj = SimpleNamespace(
        prompt_tokens=10, completion_tokens=4,
        prompt_tokens_details=SimpleNamespace(cached_tokens=6), completion_tokens_details=None,
    )  # fmt: skip
    assert billed_usage(obj) == BilledUsage(10, 4, 6, 0, 0)


@pytest.mark.parametrize(
    "usage",
    [
        None, {}, {"total_tokens": 5}, {"prompt_tokens": "12"}, {"prompt_tokens": True},
        {"input_tokens": -3},
    ],
)  # fmt: skip
def test_nothing_usable_is_none(usage: Any) -> None:
    assert billed_usage(usage) is None


def test_an_upstream_claiming_parts_larger_than_wholes_is_clamped() -> None:
    lying = {"prompt_tokens": 10, "completion_tokens": 2,
             "prompt_tokens_details": {"cached_tokens": 99},
             "completion_tokens_details": {"reasoning_tokens": 50}}  # fmt: skip
    assert billed_usage(lying) == BilledUsage(10, 2, 10, 0, 2)


@pytest.mark.parametrize(
    ("usage", "response", "provider", "flavor", "model"),
    [
        (OPENAI_CHAT, {"object": "chat.completion"}, "openai", "chat", "gpt-4o"),
        (OPENAI_RESPONSES, {"object": "response"}, "openai", "responses", "gpt-4o"),
        (ANTHROPIC, {"type": "message"}, "anthropic", "default", "claude-sonnet-4-5"),
    ],
)
def test_each_shape_costs_what_genai_prices_says_from_its_own_reading(
    usage: dict[str, Any], response: dict[str, Any], provider: str, flavor: str, model: str
) -> None:
    extracted = extract_usage(
        {**response, "model": model, "usage": usage}, provider_id=provider, api_flavor=flavor
    )
    expected = micros(calc_price(extracted.usage, model, provider_id=provider).total_price)
    b = billed_usage(usage)
    assert b is not None
    prices = PriceTable().prices(model, provider)
    got = prices.cost(
        b.prompt_tokens, b.completion_tokens, b.cached_prompt_tokens, b.cache_write_tokens,
        b.reasoning_tokens,
    )  # fmt: skip
    assert got == expected
    # the mix-up: Anthropic's input_tokens read as the whole prompt prices it very differently
    if provider == "anthropic":
        wrong = prices.cost(usage["input_tokens"], usage["output_tokens"], 0, 0, 0)
        assert wrong != got
