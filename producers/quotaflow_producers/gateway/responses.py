"""What the gateway answers: OpenAI-style errors, rate-limit headers, the 429 template."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from quotaflow._exceptions import ConfigError
from quotaflow.cache import LimitUsage
from quotaflow.units import dollars
from quotaflow.windows import format_duration

#: Headers naming the tightest money limit: ``...-limit`` (its name), ``...-limit-usd``,
#: ``...-remaining-usd`` and ``...-reset`` (when all of its current spend has freed).
BUDGET_HEADER = "x-quotaflow-budget-"


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def pick_limit(rows: tuple[LimitUsage, ...], units: tuple[str, ...]) -> LimitUsage | None:
    """The key-wide per-minute limit of the first unit that has one, else any of them."""
    candidates = [r for r in rows if r.spec.unit in units and "/" not in r.name]
    candidates = candidates or [r for r in rows if r.spec.unit in units]
    if not candidates:
        return None
    minute = [r for r in candidates if r.spec.window == 60]
    pool = minute or candidates
    return min(pool, key=lambda r: units.index(r.spec.unit))


def ratelimit_headers(rows: tuple[LimitUsage, ...], now: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers from the limits that bind the call, and the budget
    closest to running out (``x-quotaflow-budget-*``, in dollars) where money is limited."""
    headers: dict[str, str] = {}
    budgets = [r for r in rows if r.spec.money]
    if budgets:
        tightest = min(budgets, key=lambda r: r.remaining)
        headers[BUDGET_HEADER + "limit"] = tightest.name
        headers[BUDGET_HEADER + "limit-usd"] = dollars(tightest.spec.limit)
        headers[BUDGET_HEADER + "remaining-usd"] = dollars(tightest.remaining)
        headers[BUDGET_HEADER + "reset"] = format_duration(tightest.reset_at - now)
    for kind, dims in (
        ("requests", ("requests",)),
        ("tokens", ("tokens", "prompt_tokens", "completion_tokens")),
    ):
        row = pick_limit(rows, dims)
        if row is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(row.spec.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(row.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = format_duration(row.reset_at - now)
    return headers


def remaining_tokens(rows: tuple[LimitUsage, ...]) -> int | None:
    row = pick_limit(rows, ("tokens", "prompt_tokens", "completion_tokens"))
    return None if row is None else row.remaining


class RateLimitTemplate:
    """A Dev Proxy style custom 429: ``{"statusCode", "headers": [{"name", "value"}], "body"}``;
    a header or string value ``@dynamic`` becomes the retry-after seconds."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: Any) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @classmethod
    def load(cls, path: Path) -> RateLimitTemplate:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the rate-limit response file: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        status = doc.get("statusCode", 429)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ConfigError(f"{path}: statusCode: must be an HTTP error status, got {status!r}")
        headers = []
        for i, item in enumerate(doc.get("headers", [])):
            if not isinstance(item, dict) or "name" not in item or "value" not in item:
                raise ConfigError(f"{path}: headers[{i}]: expected {{'name': ..., 'value': ...}}")
            headers.append((str(item["name"]), str(item["value"])))
        return cls(status, headers, doc.get("body", ""))

    def render(self, retry_after: float, extra_headers: dict[str, str]) -> web.Response:
        seconds = str(math.ceil(max(retry_after, 0)))

        def fill(value: Any) -> Any:
            if value == "@dynamic":
                return seconds
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            if isinstance(value, list):
                return [fill(v) for v in value]
            return value

        headers = CIMultiDict(extra_headers)
        for name, value in self.headers:
            headers[name] = fill(value)  # the template's own value wins, whatever its case
        body = fill(self.body)
        if isinstance(body, str):
            return web.Response(status=self.status, text=body, headers=headers)
        return web.json_response(body, status=self.status, headers=headers)
