"""Usage of a streamed completion: the provider's final usage chunk when it sends one
(``stream_options.include_usage``), otherwise the streamed content counted locally."""

from __future__ import annotations

import json
from typing import Any

from quotaflow.tokens import count_text


class StreamUsage:
    """Feed it server-sent-event bytes (or parsed events) as they pass; read the usage after."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.usage: dict[str, Any] | None = None
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

    def completion_tokens(self) -> int:
        """Completion tokens: the provider's figure if it sent one, else a local count."""
        if self.usage is not None and "completion_tokens" in self.usage:
            return int(self.usage["completion_tokens"])
        return count_text("".join(self._text), self.model) if self._text else 0

    @property
    def reported(self) -> bool:
        """True when the provider reported usage (the counts are not estimates)."""
        return self.usage is not None
