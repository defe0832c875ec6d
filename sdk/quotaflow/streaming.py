"""Usage of a streamed call, read from its server-sent events as they pass.

Each API says its usage at a different point of the stream:

- OpenAI Chat Completions: a final chunk with ``usage`` (``stream_options.include_usage``), or
  none, and then the streamed content is counted locally;
- OpenAI Responses: the ``response.completed`` event (or ``response.incomplete`` /
  ``response.failed``) carries the whole response, its ``usage`` included; text arrives in
  ``response.output_text.delta`` events;
- Anthropic Messages: ``message_start`` carries the input side (``input_tokens`` and the cache
  parts), each ``message_delta`` the cumulative ``output_tokens``; text arrives in
  ``content_block_delta`` events.

A stream cut short (the caller left) has only part of this: what was reported is kept (an
Anthropic stream's input side), the rest is counted from the content delivered.
"""

from __future__ import annotations

import json
from typing import Any

from quotaflow.tokens import count_text

#: Responses API events that end a response and carry its usage.
_RESPONSE_DONE = ("response.completed", "response.incomplete", "response.failed")


class StreamUsage:
    """Feed it server-sent-event bytes (or parsed events) as they pass; read the usage after."""

    def __init__(self, model: str) -> None:
        self.model = model
        #: The call's complete usage, once the stream has reported it.
        self.usage: dict[str, Any] | None = None
        #: Usage reported before the end (Anthropic's input side at ``message_start``).
        self.partial: dict[str, Any] | None = None
        self.done = False
        self._text: list[str] = []
        self._buffer = b""

    def feed_bytes(self, chunk: bytes) -> None:
        """Parse complete ``data:`` lines; a partial line waits for the next chunk."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.feed_event(event)

    def feed_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if isinstance(kind, str) and kind:
            self._typed_event(kind, event)
            return
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            content = delta.get("content") if delta else choice.get("text")
            if isinstance(content, str):
                self._text.append(content)
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") or {}
                self._text.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))

    def _typed_event(self, kind: str, event: dict[str, Any]) -> None:
        """The Responses API's and Anthropic's events (both name their ``type``)."""
        if kind in _RESPONSE_DONE:
            response = event.get("response")
            usage = response.get("usage") if isinstance(response, dict) else None
            if isinstance(usage, dict):
                self.usage = usage
            self.done = True
        elif kind.endswith(".delta") and kind.startswith("response."):
            # output_text, function_call_arguments, reasoning_summary_text, refusal...
            delta = event.get("delta")
            if isinstance(delta, str):
                self._text.append(delta)
        elif kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self.partial = dict(usage)
        elif kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                for field in ("text", "partial_json", "thinking"):
                    if isinstance(delta.get(field), str):
                        self._text.append(delta[field])
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                # output_tokens is cumulative: the last delta's is the call's
                merged = {**(self.partial or {}), **usage}
                self.partial = merged
                self.usage = merged
        elif kind == "message_stop":
            self.done = True

    def completion_tokens(self) -> int:
        """Completion tokens: the provider's figure if it sent one, else a local count."""
        usage = self.usage or {}
        for field in ("completion_tokens", "output_tokens"):
            if isinstance(usage.get(field), int):
                return int(usage[field])
        return count_text("".join(self._text), self.model) if self._text else 0

    @property
    def reported(self) -> bool:
        """True when the provider reported usage (the counts are not estimates)."""
        return self.usage is not None
