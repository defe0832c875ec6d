"""``config/prices.yaml``: negotiated prices, fine-tunes and self-hosted models over
genai-prices' data, parsed and checked (errors name the file, the entry and the field).

Prices are dollars per million tokens (``*_mtok``), per request and per image, read as exact
decimals (a YAML ``0.3`` is the decimal 0.3, not its float)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from quotaflow._exceptions import ConfigError

#: Per-token price keys of an entry (dollars per million tokens).
TOKEN_KEYS = ("input_mtok", "cache_read_mtok", "cache_write_mtok", "output_mtok", "reasoning_mtok")
#: Every price an entry may set.
OVERRIDE_KEYS = (*TOKEN_KEYS, "per_request", "per_image")


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """One ``models`` entry of prices.yaml."""

    match: str
    provider: str | None
    prices: dict[str, Decimal | None]

    def matches(self, model: str, provider: str | None) -> bool:
        if self.provider is not None and provider is not None and provider != self.provider:
            return False
        return model == self.match or fnmatch.fnmatchcase(model, self.match)


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected a price in dollars, got {value!r}")
    try:
        price = Decimal(str(value))  # str(): a YAML 0.3 is the decimal 0.3, not its float
    except InvalidOperation:
        raise ConfigError(f"{where}: {value!r} is not a number") from None
    if not price.is_finite() or price < 0:
        raise ConfigError(f"{where}: a price must be a finite number >= 0, got {value!r}")
    return price


def parse_overrides(doc: Any, source: str) -> tuple[list[PriceOverride], dict[str, str]]:
    """Validate a prices.yaml document; errors name the file, the entry and the field."""
    if doc is None:
        return [], {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping with 'models' and/or 'aliases'")
    unknown = set(doc) - {"version", "models", "aliases"}
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
    if doc.get("version", 1) != 1:
        raise ConfigError(f"{source}: version: only version 1 is known")
    overrides = []
    models = doc.get("models") or []
    if not isinstance(models, list):
        raise ConfigError(f"{source}: models: expected a list")
    for index, entry in enumerate(models):
        where = f"{source}: models[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with 'match' and 'prices'")
        extra = set(entry) - {"match", "provider", "prices"}
        if extra:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
        match, provider, prices = entry.get("match"), entry.get("provider"), entry.get("prices")
        if not isinstance(match, str) or not match:
            raise ConfigError(f"{where}.match: expected a model name or glob")
        if provider is not None and not isinstance(provider, str):
            raise ConfigError(f"{where}.provider: expected a provider id")
        if not isinstance(prices, dict) or not prices:
            raise ConfigError(f"{where}.prices: expected a mapping like {{input_mtok: 2.5}}")
        bad = set(prices) - set(OVERRIDE_KEYS)
        if bad:
            raise ConfigError(
                f"{where}.prices: unknown price(s) {', '.join(sorted(bad))}; "
                f"known: {', '.join(OVERRIDE_KEYS)}"
            )
        parsed: dict[str, Decimal | None] = {
            str(k): _decimal(v, f"{where}.prices.{k}") for k, v in prices.items()
        }
        if not {"input_mtok", "output_mtok", "per_request", "per_image"} & set(parsed):
            raise ConfigError(
                f"{where}.prices: set input_mtok, output_mtok, per_request or per_image"
            )
        overrides.append(PriceOverride(match, provider, parsed))
    aliases = doc.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in aliases.items()
    ):
        raise ConfigError(f"{source}: aliases: expected a mapping of model name to model name")
    return overrides, dict(aliases)
