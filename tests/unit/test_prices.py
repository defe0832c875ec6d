"""Prices: the hot-path arithmetic held to genai-prices' calc_price, and prices.yaml's checks."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest
from genai_prices import Usage, calc_price, data_snapshot

from quotaflow._exceptions import ConfigError
from quotaflow.price_overrides import parse_overrides
from quotaflow.prices import (
    ModelPrices,
    PriceTable,
    UnpricedModel,
    _genai_model_prices,
    load_price_table,
)
from tests.support import ROOT
from tests.support.prices import micros

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def random_usage(rng: random.Random) -> tuple[int, int, int, int, int]:
    prompt = rng.choice([0, 1, 7, 999, 128_001, 200_001, 1_000_000])
    cached = rng.randint(0, prompt)
    write = rng.randint(0, prompt - cached)
    completion = rng.choice([0, 3, 512, 20_000])
    return prompt, cached, write, completion, rng.randint(0, completion)


def test_every_model_in_genai_prices_costs_what_calc_price_says() -> None:
    """Cached, cache-write, reasoning and long-context tiers, for each of the ~2,300 models."""
    rng = random.Random(7)
    compared = 0
    for provider in data_snapshot.get_snapshot().providers:
        for model in provider.models:
            model_price = model.get_prices(NOW)
            rates, tiers = _genai_model_prices(model_price)
            ours = ModelPrices(model.id, provider.id, "test", rates, tiers)
            for _ in range(4):
                prompt, cached, write, completion, reasoning = random_usage(rng)
                usage = Usage(
                    input_tokens=prompt, cache_read_tokens=cached, cache_write_tokens=write,
                    output_tokens=completion, output_reasoning_tokens=reasoning,
                )  # fmt: skip
                expected = micros(model_price.calc_price(usage)["total_price"])
                got = ours.cost(prompt, completion, cached, write, reasoning)
                assert got == expected, (provider.id, model.id, prompt, cached, write, completion)
                compared += 1
    assert compared > 8000


def test_the_table_resolves_like_calc_price_does() -> None:
    table = PriceTable()
    ts = NOW.timestamp()
    for model, provider in [
        ("gpt-4o", "openai"),
        ("claude-sonnet-4-5", None),
        ("gpt-4o-mini", None),
    ]:
        usage = Usage(input_tokens=250_000, cache_read_tokens=1000, output_tokens=700)
        expected = calc_price(usage, model, provider_id=provider, genai_request_timestamp=NOW)
        prices = table.prices(model, provider, ts)
        assert prices.cost(250_000, 700, 1000) == micros(expected.total_price), model
        assert prices.model == expected.model.id and prices.provider == expected.provider.id


def test_time_of_day_prices_hold_only_inside_their_interval() -> None:
    """deepseek-chat has off-peak prices: a resolution never outlives its interval."""
    table = PriceTable()
    noon = NOW.timestamp()  # inside 00:30-16:30 UTC
    evening = NOW.replace(hour=20).timestamp()
    a, b = (
        table.prices("deepseek-chat", "deepseek", noon),
        table.prices("deepseek-chat", "deepseek", evening),
    )
    assert a.holds_at(noon) and not a.holds_at(evening)
    assert a.valid_until == NOW.replace(hour=16, minute=30).timestamp()
    for prices, when in ((a, NOW), (b, NOW.replace(hour=20))):
        usage = Usage(input_tokens=10_000, output_tokens=1000)
        expected = calc_price(usage, "deepseek-chat", provider_id="deepseek",
                              genai_request_timestamp=when)  # fmt: skip
        assert prices.cost(10_000, 1000) == micros(expected.total_price)


def test_an_unpriced_model_names_the_nearest_known_ones() -> None:
    table = PriceTable()
    with pytest.raises(UnpricedModel) as err:
        table.prices("gpt-4o-mnii")
    assert "gpt-4o-mini" in err.value.nearest and "gpt-4o-mini" in str(err.value)
    assert table.lookup("no-such-model-anywhere") is None


def overrides(doc: dict[str, Any]) -> PriceTable:
    models, aliases = parse_overrides(doc, "prices.yaml")
    return PriceTable(models, aliases, source="prices.yaml")


def test_overrides_win_and_change_the_table_version() -> None:
    plain = PriceTable()
    table = overrides(
        {
            "models": [
                {"match": "ft:gpt-4o-mini:acme:*",
                 "prices": {"input_mtok": 0.3, "output_mtok": 1.2}},
                {"match": "gpt-4o", "provider": "azure",
                 "prices": {"input_mtok": "2", "output_mtok": 8}},
                {"match": "dall-e-3", "prices": {"per_image": 0.04}},
            ],
            "aliases": {"gpt4": "gpt-4o"},
        }
    )  # fmt: skip
    assert table.version != plain.version and table.version.startswith(plain.version + "+")
    tuned = table.prices("ft:gpt-4o-mini:acme:support-v2")
    assert tuned.cost(1_000_000, 1_000_000) == 1_500_000  # $0.30 + $1.20, exactly
    assert table.prices("gpt-4o", "azure").cost(1_000_000, 0) == 2_000_000
    assert table.prices("gpt-4o", "openai").cost(1_000_000, 0) == 2_500_000, "provider-scoped"
    assert table.prices("dall-e-3").cost(50, 0, images=3) == 120_000
    assert table.prices("gpt4").model == "gpt-4o"
    same = overrides({"aliases": {"gpt4": "gpt-4o"}})
    assert same.version == overrides({"aliases": {"gpt4": "gpt-4o"}}).version, "deterministic"


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"models": [{"match": "m", "prices": {"input_mtok": -1}}]}, "models[0].prices.input_mtok"),
        ({"models": [{"match": "m", "prices": {"inptu_mtok": 1}}]}, "unknown price(s) inptu_mtok"),
        ({"models": [{"match": "m", "prices": {"input_mtok": "lots"}}]}, "not a number"),
        ({"models": [{"match": "m", "prices": {"input_mtok": True}}]}, "expected a price"),
        ({"models": [{"match": "m", "prices": {"input_mtok": "nan"}}]}, "finite"),
        ({"models": [{"prices": {"input_mtok": 1}}]}, "models[0].match"),
        ({"models": [{"match": "m", "prices": {"cache_read_mtok": 1}}]}, "set input_mtok"),
        ({"models": [{"match": "m", "price": {}}]}, "unknown field(s) price"),
        ({"modles": []}, "unknown field(s) modles"),
        ({"aliases": {"a": 3}}, "aliases"),
        ({"version": 2}, "version"),
    ],
)
def test_a_bad_prices_file_is_refused_naming_the_place(doc: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_overrides(doc, "prices.yaml")
    assert fragment in str(err.value) and str(err.value).startswith("prices.yaml")


def test_a_hostile_caller_naming_endless_models_cannot_grow_the_cache_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = PriceTable()
    monkeypatch.setattr(table, "CACHE_MAX", 50)
    for i in range(200):
        assert table.lookup(f"made-up-model-{i}") is None
        assert len(table.cache) <= 50
    assert table.lookup("made-up-model-199") is None, "a miss is remembered"
    assert ("made-up-model-199", None) in table.cache


def test_a_model_named_without_a_provider_is_priced_by_the_provider_that_lists_it() -> None:
    """genai-prices cannot infer whose text-embedding-3-small is (azure and openai list it):
    priced as the first-party provider's, not left unpriced (embeddings would cost nothing)."""
    table = PriceTable()
    prices = table.prices("text-embedding-3-small", None, NOW.timestamp())
    assert prices.provider == "openai"
    expected = calc_price(Usage(input_tokens=1_000_000), "text-embedding-3-small",
                          provider_id="openai", genai_request_timestamp=NOW)  # fmt: skip
    assert prices.cost(1_000_000, 0) == int(expected.total_price * 1_000_000)
    assert table.lookup("no-such-model-anywhere", None, NOW.timestamp()) is None


def test_an_image_call_is_priced_by_its_quality_and_size() -> None:
    from quotaflow.policies import parse_policies
    from quotaflow.pricing import CallPricer, image_variants

    assert image_variants("dall-e-3", {}) == ()
    assert image_variants("dall-e-3", {"image_size": "1024x1792"}) == (
        "dall-e-3/standard/1024x1792", "dall-e-3/standard",
    )  # fmt: skip
    assert image_variants("dall-e-3", {"image_quality": "hd"}) == ("dall-e-3/hd",)
    table = load_price_table(ROOT / "config" / "prices.yaml")
    pricer = CallPricer(table, parse_policies({"policies": []}))
    now = 1_800_000_000.0

    def cost(images: int, **attrs: str) -> int:
        return pricer.cost("k", "dall-e-3", now, 0, 0, images=images, attrs=attrs)

    assert cost(1) == 40_000  # the model's own price
    assert cost(2, image_size="1024x1024", image_quality="hd") == 160_000
    assert cost(1, image_size="1792x1024", image_quality="hd") == 120_000
    assert cost(1, image_size="1792x1024") == 80_000  # standard, wide
    assert cost(1, image_size="1024x1024", image_quality="weird") == 40_000  # no such variant
