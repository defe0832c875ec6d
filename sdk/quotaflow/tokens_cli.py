"""``quotaflow tokens count`` and ``quotaflow tokens bench``: SDK-only commands."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from quotaflow._exceptions import ConfigError
from quotaflow.tokens import count_request, encoding_for_model, request_kind


def register(sub: Any) -> None:
    p = sub.add_parser("tokens", help="count prompt tokens the way OpenAI does")
    tokens = p.add_subparsers(dest="tokens_command", metavar="ACTION")
    tokens.required = True
    count = tokens.add_parser("count", help="prompt tokens of a request JSON file ('-': stdin)")
    count.add_argument("file")
    count.add_argument("--model", help="override the request's model")
    count.set_defaults(func=_cmd_count)
    bench = tokens.add_parser("bench", help="time counting a ~1,000-token chat prompt")
    bench.add_argument("--model", default="gpt-4o")
    bench.add_argument("--iterations", type=int, default=2000)
    bench.add_argument("--json", action="store_true", help="print JSON only")
    bench.set_defaults(func=_cmd_bench)


def _cmd_count(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"{args.file}: cannot read: {exc}") from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{args.file}: not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{args.file}: expected a JSON object (an OpenAI request body)")
    model = args.model or body.get("model")
    try:
        result = count_request(body, model)
        kind = request_kind(body)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{args.file}: {exc}") from None
    print(json.dumps({"model": model, "kind": kind, "encoding": result.encoding,
                      "prompt_tokens": result.tokens, "estimated": result.estimated}))  # fmt: skip
    return 0


def _sample_prompt(model: str, target: int = 1000) -> list[dict[str, str]]:
    enc, _ = encoding_for_model(model)
    sentence = "Quota systems keep a fleet of services inside one shared budget of tokens. "
    text = sentence * (target // len(enc.encode(sentence)) + 1)
    return [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": enc.decode(enc.encode(text)[: target - 20])},
    ]


def _cmd_bench(args: argparse.Namespace) -> int:
    messages = _sample_prompt(args.model)
    body = {"model": args.model, "messages": messages}
    tokens = count_request(body).tokens
    for _ in range(50):  # warm caches and the encoder
        count_request(body)
    samples = []
    for _ in range(args.iterations):
        start = time.perf_counter_ns()
        count_request(body)
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    result = {
        "model": args.model,
        "prompt_tokens": tokens,
        "iterations": args.iterations,
        "p50_us": round(statistics.median(samples) / 1000, 1),
        "p99_us": round(samples[int(len(samples) * 0.99) - 1] / 1000, 1),
        "tokens_per_second": round(tokens / (statistics.median(samples) / 1e9)),
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
