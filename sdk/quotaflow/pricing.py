"""Pricing calls for the client: what ``check()``, ``reserve()`` and ``record()`` charge.

A model's prices are resolved once (the price table's cache, one dict lookup after the first
call of a model on a day); a model the table does not know is priced as the policy of the key
says (``unpriced``): as a fallback model, marked estimated (``estimate``), at no cost
(``free``), or not at all (``reject``: ``check()`` denies it, a record goes unpriced).
"""

from __future__ import annotations

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
        self, key: str, model: str, provider: str | None, ts: float
    ) -> tuple[ModelPrices | None, str | None]:
        """``(prices, priced_as)``: the model's own prices at ``ts`` (``priced_as`` None), or
        what its key's policy prices an unknown model at (``priced_as`` the fallback model or
        ``"free"``); ``(None, None)`` if it goes unpriced."""
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
    ) -> int:
        """What a call of this size costs in micro-dollars (0 if it goes unpriced: a policy
        that rejects unpriced models denies it before money matters)."""
        if model is None:
            return 0
        prices, _ = self.resolve(key, model, provider, ts)
        if prices is None:
            return 0
        return prices.cost(prompt, completion, cached, images=images, requests=requests)
