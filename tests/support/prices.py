"""genai-prices' own answer for a call, in micro-dollars: what quotaflow's costs are held to."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from genai_prices import Usage, calc_price


def micros(dollars: Decimal) -> int:
    """Dollars to micro-dollars, rounded half up (as quotaflow rounds)."""
    return int((dollars * 10**6).quantize(Decimal(1), ROUND_HALF_UP))


def genai_cost(
    model: str,
    prompt: int,
    completion: int,
    cached: int = 0,
    cache_write: int = 0,
    reasoning: int = 0,
    provider: str | None = None,
) -> int:
    """``calc_price`` for this usage (genai-prices' names: cache reads and writes within
    input_tokens, reasoning within output_tokens), in micro-dollars."""
    usage = Usage(input_tokens=prompt, cache_read_tokens=cached, cache_write_tokens=cache_write,
                  output_tokens=completion, output_reasoning_tokens=reasoning)  # fmt: skip
    return micros(calc_price(usage, model, provider_id=provider).total_price)
