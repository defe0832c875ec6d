"""Prices: what one LLM call costs, in integer micro-dollars, from one versioned price table.

The table is `genai-prices`' bundled data (offline: its update functions are never called, so
nothing here touches the network) overridden by ``config/prices.yaml`` for negotiated prices,
fine-tunes and self-hosted models::

    version: 1
    models:
      - match: "ft:gpt-4o-mini:acme:*"      # a model name or a glob
        provider: openai                    # optional: only calls that name this provider
        prices: {input_mtok: 0.3, cache_read_mtok: 0.15, output_mtok: 1.2}
      - match: "llama-3.1-70b-local"
        prices: {input_mtok: 0, output_mtok: 0}
      - match: "dall-e-3"
        prices: {per_image: 0.04}
    aliases:
      gpt4: gpt-4o                          # price "gpt4" as gpt-4o

Prices per million tokens (``*_mtok``), per request and per image are in dollars.

``calc_price`` costs ~120 us a call, far too slow for ``record()``. :meth:`PriceTable.prices`
resolves a model's prices once into :class:`ModelPrices`, integer rates scaled by
:data:`RATE_SCALE`, and :meth:`ModelPrices.cost` is a few integer multiplications. Every unit a
provider bills is decomposed the way genai-prices does: cache reads and writes are parts of the
prompt, reasoning is part of the completion, and a part the model has no price for is billed at
its whole's price (``tests/unit/test_prices.py`` holds the two to the micro-dollar).

Historic and time-of-day prices: a resolution is valid for the UTC day it was made in (and
inside a time-of-day price's interval), so a call is priced at the prices of its own time.
Service-tier variants (flex, priority) are not applied: calls are priced at standard prices.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from importlib.metadata import version as _package_version
from pathlib import Path
from typing import Any

from quotaflow._exceptions import ConfigError, UnpricedModel
from quotaflow._yaml import Missing, read_yaml
from quotaflow.policies import PolicySet
from quotaflow.price_overrides import PriceOverride, parse_overrides

# re-exported: money is formatted in one place
from quotaflow.units import dollars as dollars

#: Rates are integers: micro-dollars per unit, times this. Exact for prices with up to 18
#: decimals of a dollar per million tokens: the data has float artefacts like 0.13999999999999999,
#: and genai-prices prices them exactly, so we do too (Python's integers do not overflow).
RATE_SCALE = 10**18

# genai-prices' names for the per-token prices a prices.yaml entry sets
_GENAI_KEYS = {
    "input_mtok": "input_mtok",
    "cache_read_mtok": "cache_read_mtok",
    "cache_write_mtok": "cache_write_mtok",
    "output_mtok": "output_mtok",
    "reasoning_mtok": "output_reasoning_mtok",
}

#: Rates in the order :meth:`ModelPrices.cost` reads them: input, output and per-request rates,
#: then cache read, cache write and reasoning as differences from their whole's rate (most calls
#: have none of them: their terms are skipped), then the per-image rate.
Rates = tuple[int, int, int, int, int, int, int]


def _rate(price: Decimal | None, per_unit_micros: int) -> int | None:
    """A price in dollars per ``1e6 / per_unit_micros`` units as micro-dollars per unit, scaled."""
    if price is None:
        return None
    return int((price * per_unit_micros * RATE_SCALE).to_integral_value())


@dataclass(frozen=True, slots=True)
class ModelPrices:
    """One model's resolved prices: integer rates (see :data:`Rates`), and where and when they
    hold. ``tiers`` are ``(prompt tokens above which, rates)``, highest first (long-context
    prices)."""

    model: str
    provider: str
    source: str
    rates: Rates
    tiers: tuple[tuple[int, Rates], ...] = ()
    valid_from: float = -math.inf
    valid_until: float = math.inf

    def cost(
        self,
        prompt: int,
        completion: int,
        cached: int = 0,
        cache_write: int = 0,
        reasoning: int = 0,
        images: int = 0,
        requests: int = 1,
    ) -> int:
        """This call's price in micro-dollars, rounded half up (integer arithmetic only; on
        record()'s path, hence the flat code)."""
        rates = self.rates
        if self.tiers:
            for start, tier in self.tiers:
                if prompt > start:
                    rates = tier
                    break
        r_in, r_out, r_req, d_read, d_write, d_reason, r_img = rates
        scaled = prompt * r_in + completion * r_out + requests * r_req
        if cached:
            scaled += cached * d_read
        if cache_write:
            scaled += cache_write * d_write
        if reasoning:
            scaled += reasoning * d_reason
        if images:
            scaled += images * r_img
        return (2 * scaled + RATE_SCALE) // (2 * RATE_SCALE)

    def holds_at(self, ts: float) -> bool:
        return self.valid_from <= ts < self.valid_until

    def describe(self) -> dict[str, Any]:
        """The prices in dollars, for ``quotaflow prices show``."""
        return {
            "model": self.model,
            "provider": self.provider,
            "source": self.source,
            "prices": _dollars(self.rates),
            "tiers": [{"above_prompt_tokens": s, "prices": _dollars(r)} for s, r in self.tiers],
        }


def _dollars(rates: Rates) -> dict[str, str]:
    """Rates back as dollar prices (per million tokens, per request, per image)."""
    r_in, r_out, r_req, d_read, d_write, d_reason, r_img = rates
    per_mtok = {
        "input_mtok": r_in,
        "cache_read_mtok": r_in + d_read,
        "cache_write_mtok": r_in + d_write,
        "output_mtok": r_out,
        "reasoning_mtok": r_out + d_reason,
    }
    shown = {k: Decimal(v) / RATE_SCALE for k, v in per_mtok.items()}
    shown["per_request"] = Decimal(r_req) / RATE_SCALE / 10**6
    shown["per_image"] = Decimal(r_img) / RATE_SCALE / 10**6
    return {k: f"{v.normalize():f}" for k, v in shown.items()}


def _rates_of(prices: dict[str, Decimal | None]) -> Rates:
    """Rates from dollar prices; a part with no price is billed at its whole's price."""
    r_in = _rate(prices.get("input_mtok"), 1) or 0
    r_out = _rate(prices.get("output_mtok"), 1) or 0
    r_read = _rate(prices.get("cache_read_mtok"), 1)
    r_write = _rate(prices.get("cache_write_mtok"), 1)
    r_reason = _rate(prices.get("reasoning_mtok"), 1)
    return (
        r_in,
        r_out,
        _rate(prices.get("per_request"), 10**6) or 0,
        0 if r_read is None else r_read - r_in,
        0 if r_write is None else r_write - r_in,
        0 if r_reason is None else r_reason - r_out,
        _rate(prices.get("per_image"), 10**6) or 0,
    )


# -- genai-prices ------------------------------------------------------------------------------


#: What a call of a model its policy says is ``free`` is priced at.
FREE = ModelPrices("free", "", "policy: unpriced free", (0, 0, 0, 0, 0, 0, 0))


def check_unpriced_fallbacks(policies: PolicySet, table: PriceTable) -> None:
    """Every policy that estimates unpriced calls names a model the table prices (else a
    :class:`ConfigError` naming the policy and the nearest known models)."""
    for policy in policies.policies:
        if policy.unpriced == "estimate" and table.lookup(policy.unpriced_as) is None:
            nearest = ", ".join(table.nearest(policy.unpriced_as)) or "none"
            raise ConfigError(
                f"{policies.source}: policy {policy.name!r}: unpriced_as "
                f"{policy.unpriced_as!r} has no price; nearest known: {nearest}"
            )


#: Providers asked first for a model named without one, when genai-prices cannot tell whose it
#: is: the labs that sell their own models (resellers like azure or aws list many of them too).
FIRST_PARTY = ("openai", "anthropic", "google", "mistral", "deepseek", "x-ai", "cohere", "meta")


def _listed_by_a_provider(snapshot: Any, model: str) -> tuple[Any, Any] | None:
    """The first provider (first-party ones first, then genai-prices' order) that lists
    ``model`` under its exact id, and that model; None if none does."""
    rank = {name: i for i, name in enumerate(FIRST_PARTY)}
    providers = sorted(snapshot.providers, key=lambda p: rank.get(p.id, len(rank)))
    for provider in providers:
        for found in provider.models:
            if found.id == model:
                return provider, found
    return None


def _genai_model_prices(model_price: Any) -> tuple[Rates, tuple[tuple[int, Rates], ...]]:
    """Rates (and tiers) from a genai-prices ``ModelPrice``."""
    from genai_prices.types import TieredPrices

    base: dict[str, Decimal | None] = {}
    tiered: dict[str, Any] = {}
    starts: set[int] = set()
    for ours, theirs in _GENAI_KEYS.items():
        value = getattr(model_price, theirs, None)
        if isinstance(value, TieredPrices):
            tiered[ours] = value
            base[ours] = value.base
            starts.update(t.start for t in value.tiers)
        else:
            base[ours] = value
    kcount = getattr(model_price, "requests_kcount", None)
    if isinstance(kcount, Decimal):
        base["per_request"] = kcount / 1000
    rates = _rates_of(base)
    tiers = []
    for start in sorted(starts, reverse=True):
        at_tier = dict(base)
        for name, value in tiered.items():
            for tier in reversed(value.tiers):
                if start >= tier.start:
                    at_tier[name] = tier.price
                    break
        tiers.append((start, _rates_of(at_tier)))
    return rates, tuple(tiers)


def _validity(model: Any, ts: float) -> tuple[float, float]:
    """The interval around ``ts`` in which a genai-prices model's prices do not change."""
    from genai_prices.types import TimeOfDateConstraint

    day = math.floor(ts / 86400) * 86400
    start, end = float(day), float(day + 86400)
    if isinstance(model.prices, list):
        for conditional in model.prices:
            constraint = conditional.constraint
            if isinstance(constraint, TimeOfDateConstraint):
                for moment in (constraint.start_time, constraint.end_time):
                    at = day + moment.hour * 3600 + moment.minute * 60 + moment.second
                    if at <= ts:
                        start = max(start, float(at))
                    else:
                        end = min(end, float(at))
    return start, end


# -- the table ---------------------------------------------------------------------------------


class PriceTable:
    """genai-prices' data overridden by prices.yaml, resolved once per model.

    ``version`` names the table: the genai-prices release plus a hash of the overrides. Every
    record says which version priced it, so an audit can explain any cost.
    """

    CACHE_MAX = 50_000

    def __init__(
        self,
        overrides: Iterable[PriceOverride] = (),
        aliases: dict[str, str] | None = None,
        *,
        source: str = "<none>",
    ) -> None:
        self.overrides = tuple(overrides)
        self.aliases = dict(aliases or {})
        self.source = source
        digest = hashlib.sha256(json.dumps(_canonical(self), sort_keys=True).encode())
        self.genai_version = _package_version("genai-prices")
        self.version = f"genai-prices-{self.genai_version}" + (
            f"+{digest.hexdigest()[:12]}" if self.overrides or self.aliases else ""
        )
        #: Resolved prices per (model, provider), None for unpriced: what record() reads.
        self.cache: dict[tuple[str, str | None], ModelPrices | None] = {}

    def prices(
        self, model: str, provider: str | None = None, ts: float | None = None
    ) -> ModelPrices:
        """The prices of ``model`` at ``ts`` (default now); raises :class:`UnpricedModel`."""
        found = self.lookup(model, provider, ts)
        if found is None:
            raise UnpricedModel(model, provider, self.nearest(model))
        return found

    def lookup(
        self, model: str, provider: str | None = None, ts: float | None = None
    ) -> ModelPrices | None:
        """The prices of ``model`` at ``ts`` (default now), None if unpriced. Misses are
        remembered too: a caller naming unknown models costs one resolution each."""
        at = time.time() if ts is None else ts  # check() asks this for reject policies
        cache_key = (model, provider)
        if cache_key in self.cache:
            cached = self.cache[cache_key]
            if cached is None or cached.holds_at(at):
                return cached
        resolved = self._resolve(model, provider, at)
        if len(self.cache) >= self.CACHE_MAX:
            self.cache.clear()  # bounded: a hostile caller can name endless models
        self.cache[cache_key] = resolved
        return resolved

    def record_cost(self, r: Any) -> int | None:
        """The cost of a usage record that came without one (a v1 record), at the prices of
        its own time; None if its model is unpriced. The worker and the audit both price so."""
        found = self.lookup(r.model, r.provider, r.ts)
        if found is None:
            return None
        return found.cost(
            r.prompt_tokens, r.completion_tokens, r.cached_prompt_tokens, r.cache_write_tokens,
            r.reasoning_tokens, r.images, r.requests,
        )  # fmt: skip

    def _resolve(self, model: str, provider: str | None, ts: float) -> ModelPrices | None:
        priced_as = self.aliases.get(model, model)
        for override in self.overrides:
            if override.matches(priced_as, provider):
                return ModelPrices(
                    priced_as, provider or override.provider or "", f"prices.yaml {override.match}",
                    _rates_of(override.prices),
                )  # fmt: skip
        from genai_prices import data_snapshot

        snapshot = data_snapshot.get_snapshot()
        try:
            found_provider, found = snapshot.find_provider_model(priced_as, None, provider, None)
        except LookupError:
            if provider is not None:
                return None
            # genai-prices infers a provider from a model name only for some names
            # (text-embedding-3-small is not one): take the first that lists the model itself
            pair = _listed_by_a_provider(snapshot, priced_as)
            if pair is None:
                return None
            found_provider, found = pair
        when = dt.datetime.fromtimestamp(ts, dt.UTC)
        rates, tiers = _genai_model_prices(found.get_prices(when))
        valid_from, valid_until = _validity(found, ts)
        return ModelPrices(
            found.id, found_provider.id, f"genai-prices {found_provider.id}/{found.id}",
            rates, tiers, valid_from, valid_until,
        )  # fmt: skip

    def nearest(self, model: str, n: int = 5) -> list[str]:
        """Known model names closest to ``model`` (for errors that say what was meant)."""
        return difflib.get_close_matches(model.lower(), _known_names(self), n=n, cutoff=0.5)


def _canonical(table: PriceTable) -> dict[str, Any]:
    return {
        "models": [
            {"match": o.match, "provider": o.provider, "prices": {k: str(v) for k, v in
                                                                  o.prices.items()}}
            for o in table.overrides
        ],
        "aliases": table.aliases,
    }  # fmt: skip


def _known_names(table: PriceTable) -> list[str]:
    from genai_prices import data_snapshot

    names = {m.id for p in data_snapshot.get_snapshot().providers for m in p.models}
    names.update(o.match for o in table.overrides)
    names.update(table.aliases)
    return sorted(names)


def load_price_table(path: str | Path | None) -> PriceTable:
    """genai-prices' data with the overrides in ``path`` (none if ``path`` is None or absent)."""
    if path is None:
        return PriceTable()
    path = Path(path)
    try:
        doc = read_yaml(path, "prices file")
    except Missing:
        return PriceTable(source=str(path))
    overrides, aliases = parse_overrides(doc, str(path))
    return PriceTable(overrides, aliases, source=str(path))
