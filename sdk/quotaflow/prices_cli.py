"""``quotaflow prices show`` and ``quotaflow prices check``: what a model costs, and whether a
prices.yaml is valid. SDK-only commands (the price table is the SDK's)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from quotaflow._exceptions import ConfigError
from quotaflow.prices import PriceTable, dollars, load_price_table


def register(sub: Any) -> None:
    p = sub.add_parser("prices", help="the price table: genai-prices plus config/prices.yaml")
    prices = p.add_subparsers(dest="prices_command", metavar="ACTION")
    prices.required = True
    show = prices.add_parser("show", help="a model's prices, where they come from, an example")
    show.add_argument("model")
    show.add_argument("--provider", help="the provider id (default: the one the model implies)")
    show.add_argument("--file", type=Path, help="prices file (default: QUOTAFLOW_PRICES_FILE)")
    show.add_argument("--json", action="store_true", help="print JSON only")
    show.set_defaults(func=_cmd_show)
    check = prices.add_parser("check", help="validate a prices file; every alias must resolve")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_cmd_check)


def _table(path: Path | None) -> PriceTable:
    if path is None:
        from quotaflow.settings import load_settings

        path = load_settings().prices_file
    return load_price_table(path)


def _cmd_show(args: argparse.Namespace) -> int:
    table = _table(args.file)
    prices = table.prices(args.model, args.provider)  # UnpricedModel names the nearest ones
    example = prices.cost(1000, 1000)
    doc = {
        "asked": args.model,
        **prices.describe(),
        "price_version": table.version,
        "example": {"prompt_tokens": 1000, "completion_tokens": 1000, "cost_micros": example,
                    "cost_usd": dollars(example)},
    }  # fmt: skip
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"{args.model}: {doc['provider']}/{doc['model']} from {doc['source']}")
    for name, value in doc["prices"].items():
        print(f"  {name:<16} ${value}")
    for tier in doc["tiers"]:
        above = tier["above_prompt_tokens"]
        shown = ", ".join(f"{k}=${v}" for k, v in tier["prices"].items() if v != "0")
        print(f"  above {above:,} prompt tokens: {shown}")
    print(f"  1,000 prompt + 1,000 completion tokens: ${dollars(example)}")
    print(f"  price table {table.version}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise ConfigError(f"{args.file}: prices file not found")
    table = load_price_table(args.file)
    problems = 0
    for override in table.overrides:
        scope = f" (provider {override.provider})" if override.provider else ""
        shown = ", ".join(f"{k}=${v}" for k, v in override.prices.items())
        print(f"{override.match}{scope}: {shown}")
    for alias, target in table.aliases.items():
        found = table.lookup(target)
        if found is None:
            nearest = ", ".join(table.nearest(target)) or "none"
            print(f"alias {alias} -> {target}: no price for {target!r}; nearest known: {nearest}")
            problems += 1
        else:
            print(f"alias {alias} -> {target}: {found.source}")
    if problems:
        print(f"{args.file}: {problems} alias(es) price as unknown models")
        return 1
    print(f"{args.file}: {len(table.overrides)} models, {len(table.aliases)} aliases OK "
          f"(price table {table.version})")  # fmt: skip
    return 0
