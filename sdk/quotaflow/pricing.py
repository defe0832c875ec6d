"""Pricing calls for the client: what ``check()``, ``reserve()`` and ``record()`` charge.

A model's prices are resolved once (the price table's cache, one dict lookup after the first
call of a model on a day); a model the table does not know is priced as the policy of the key
says (``unpriced``): as a fallback model, marked estimated (``estimate``), at no cost
(``free``), or not at all (``reject``: ``check()`` denies it, a record goes unpriced).
"""

from __future__ import annotations

from collections.abc import Mapping

from quotaflow.policies import PolicySet
from quotaflow.prices import FREE, ModelPrices, PriceTable


class CallPricer:
    """Resolves the prices a key's call of a model is charged at."""

    def __init__(self, table: PriceTable, policies: PolicySet) -> None:
        self.table = table
        self.policies = policies
        #: The table's resolved prices by (model, provider): record() reads it inline.
        self.cache = table.cache
        self.version = table.version

    def resolve(
        self,
        key: str,
        model: str,
        provider: str | None,
        ts: float,
        attrs: Mapping[str, str] | None = None,
    ) -> tuple[ModelPrices | None, str | None]:
        """``(prices, priced_as)``: the model's own prices at ``ts`` (``priced_as`` None), or
        what its key's policy prices an unknown model at (``priced_as`` the fallback model or
        ``"free"``); ``(None, None)`` if it goes unpriced. An image call (``attrs`` with its
        ``image_size``/``image_quality``) takes the table's price for that variant where it
        has one (``priced_as`` names it)."""
        if attrs is not None:
            for variant in image_variants(model, attrs):
                prices = self.table.lookup(variant, provider, ts)
                if prices is not None:
                    return prices, variant
        prices = self.cache.get((model, provider))
        if prices is None or not prices.valid_from <= ts < prices.valid_until:
            prices = self.table.lookup(model, provider, ts)  # first call of a model, or a day
        if prices is not None:
            return prices, None
        bindings = self.policies.resolve(key, model)
        if not bindings:
            return None, None
        policy = bindings[0].policy
        if policy.unpriced == "free":
            return FREE, "free"
        if policy.unpriced == "estimate":
            return self.table.lookup(policy.unpriced_as, None, ts), policy.unpriced_as
        return None, None

    def cost(
        self,
        key: str,
        model: str | None,
        ts: float,
        prompt: int,
        completion: int,
        *,
        cached: int = 0,
        images: int = 0,
        requests: int = 1,
        provider: str | None = None,
        attrs: Mapping[str, str] | None = None,
    ) -> int:
        """What a call of this size costs in micro-dollars (0 if it goes unpriced: a policy
        that rejects unpriced models denies it before money matters)."""
        if model is None:
            return 0
        prices, _ = self.resolve(key, model, provider, ts, attrs if images else None)
        if prices is None:
            return 0
        return prices.cost(prompt, completion, cached, images=images, requests=requests)


#: The record attrs an image call's price can depend on (set by reserve() from the request).
IMAGE_SIZE, IMAGE_QUALITY = "image_size", "image_quality"


def image_variants(model: str, attrs: Mapping[str, str]) -> tuple[str, ...]:
    """The price-table names an image call is looked up by, most specific first:
    ``dall-e-3/hd/1792x1024``, then ``dall-e-3/hd`` (prices.yaml entries, globs allowed). An
    unsaid quality is OpenAI's default, ``standard``; no size, no size variant."""
    if IMAGE_SIZE not in attrs and IMAGE_QUALITY not in attrs:
        return ()
    quality = attrs.get(IMAGE_QUALITY) or "standard"
    size = attrs.get(IMAGE_SIZE)
    variants = (f"{model}/{quality}/{size}",) if size else ()
    return (*variants, f"{model}/{quality}")
