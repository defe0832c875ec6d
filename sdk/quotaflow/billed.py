"""What a call billed, read from a provider's ``usage`` object in any of its documented shapes.

Providers count the same things differently, and mixing them up makes costs wrong by multiples
(LiteLLM #36168 priced Anthropic's cache reads as fresh input, 4x):

- OpenAI Chat Completions: ``prompt_tokens`` *includes* the cached tokens, which are
  ``prompt_tokens_details.cached_tokens``; ``completion_tokens`` includes
  ``completion_tokens_details.reasoning_tokens``.
- OpenAI Responses: the same, named ``input_tokens`` / ``input_tokens_details.cached_tokens``
  and ``output_tokens`` / ``output_tokens_details.reasoning_tokens``.
- Anthropic Messages: ``input_tokens`` *excludes* ``cache_read_input_tokens`` and
  ``cache_creation_input_tokens``: they are added in, so ``prompt_tokens`` is every input token
  and the cache parts lie within it, as the usage record counts them.

:func:`billed_usage` reads a ``dict`` or a client's usage object (attributes) alike.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class BilledUsage(NamedTuple):
    """A call's billed units as the usage record counts them (parts within their wholes)."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _count(obj: Any, name: str) -> int | None:
    value = _get(obj, name) if obj is not None else None
    # bool is an int, and never a count
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _detail(obj: Any, details: str, name: str) -> int:
    return _count(_get(obj, details), name) or 0


def is_anthropic_shape(usage: Any) -> bool:
    """Anthropic's usage names its cache parts; OpenAI's never does."""
    return (
        _get(usage, "cache_read_input_tokens") is not None
        or _get(usage, "cache_creation_input_tokens") is not None
    )


def billed_usage(usage: Any, provider: str | None = None) -> BilledUsage | None:
    """The billed units in ``usage``, or None when it reports neither prompt nor output tokens.

    ``provider`` (``"anthropic"``) settles the one ambiguous case: a usage with only
    ``input_tokens`` and ``output_tokens`` reads the same in both shapes when nothing was cached.
    """
    if usage is None:
        return None
    prompt = _count(usage, "prompt_tokens")
    if prompt is not None or _count(usage, "completion_tokens") is not None:
        # Chat Completions (and legacy completions, embeddings: no completion tokens)
        completion = _count(usage, "completion_tokens") or 0
        return _within(
            prompt or 0,
            completion,
            _detail(usage, "prompt_tokens_details", "cached_tokens"),
            0,
            _detail(usage, "completion_tokens_details", "reasoning_tokens"),
        )
    inputs, output = _count(usage, "input_tokens"), _count(usage, "output_tokens")
    if inputs is None and output is None:
        return None
    if provider == "anthropic" or is_anthropic_shape(usage):
        read = _count(usage, "cache_read_input_tokens") or 0
        write = _count(usage, "cache_creation_input_tokens") or 0
        return BilledUsage((inputs or 0) + read + write, output or 0, read, write, 0)
    return _within(
        inputs or 0,
        output or 0,
        _detail(usage, "input_tokens_details", "cached_tokens"),
        0,
        _detail(usage, "output_tokens_details", "reasoning_tokens"),
    )


def _within(prompt: int, completion: int, cached: int, write: int, reasoning: int) -> BilledUsage:
    """A usage whose parts cannot exceed their wholes, whatever an upstream claims."""
    cached = min(cached, prompt)
    return BilledUsage(
        prompt, completion, cached, min(write, prompt - cached), min(reasoning, completion)
    )
