"""Reservations: admit a call by what it may cost, settle it by what it did cost.

Many calls in flight can each pass ``check()`` before any of them is recorded. A reservation
closes that gap: it holds the call's estimated prompt tokens plus its output ceiling in the local
count from the moment it is admitted, and ``settle()`` replaces the hold with the real usage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol

from quotaflow.billed import billed_usage
from quotaflow.decision import Decision
from quotaflow.record import RecordedUsage, Status
from quotaflow.streaming import StreamUsage


class RecordUsage(Protocol):
    """What a reservation records its usage with: ``QuotaClient.record``."""

    def __call__(
        self,
        key: str,
        model: str,
        *,
        prompt_tokens: int = ...,
        completion_tokens: int = ...,
        cached_prompt_tokens: int = ...,
        cache_write_tokens: int = ...,
        reasoning_tokens: int = ...,
        images: int = ...,
        provider: str | None = ...,
        status: Status = ...,
        estimated: bool = ...,
        id: str | None = ...,
        attrs: Mapping[str, str] | None = ...,
    ) -> RecordedUsage: ...


class Reservation:
    """A held call. Settle it once; as a context manager it settles itself on exit.

    Built by ``QuotaClient.reserve()``, which hands it what it needs: ``record`` (the
    client's ``record``), ``release`` (drops the hold from the local count and the client's
    open reservations) and the client's ``clock``."""

    def __init__(
        self,
        reservation_id: str,
        key: str,
        model: str,
        prompt_tokens: int,
        max_output_tokens: int,
        prompt_estimated: bool,
        expires_at: float,
        decision: Decision,
        *,
        record: RecordUsage,
        release: Callable[[], None],
        clock: Callable[[], float],
        attrs: Mapping[str, str] | None = None,
        provider: str | None = None,
        images: int = 0,
    ) -> None:
        self._record_usage = record
        self._release_hold = release
        self._clock = clock
        self.id = reservation_id
        self.key = key
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.max_output_tokens = max_output_tokens
        self.prompt_estimated = prompt_estimated
        self.expires_at = expires_at
        self.decision = decision
        #: Labels of the settled record (``operation``: which API was called).
        self.attrs = attrs
        #: Recorded, and names the shape of the usage the call reports (Anthropic's differs).
        self.provider = provider
        #: Images held: what the call may generate (settled with what it did).
        self.images = images
        self.record: RecordedUsage | None = None
        self._lock = threading.Lock()

    @property
    def settled(self) -> bool:
        return self.record is not None

    def settle(
        self,
        usage: Any = None,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        images: int | None = None,
        status: Status = "ok",
        estimated: bool | None = None,
    ) -> RecordedUsage:
        """Record the real usage and release the hold; later calls return the same record.

        ``usage`` is the provider's ``usage`` (a dict or a client's object) in any shape
        :func:`~quotaflow.billed.billed_usage` reads: its cache and reasoning parts are
        recorded too. Without it, missing figures fall back to the reservation's estimates and
        the record says ``estimated``.
        """
        with self._lock:
            if self.record is not None:
                return self.record
            billed = billed_usage(usage, self.provider)
            reported_prompt = billed.prompt_tokens if billed is not None else None
            reported_completion = billed.completion_tokens if billed is not None else None
            prompt = prompt_tokens if prompt_tokens is not None else reported_prompt
            completion = completion_tokens if completion_tokens is not None else reported_completion
            guessed = prompt is None or completion is None
            # the reported parts hold only for the reported wholes
            cached = write = reasoning = 0
            if billed is not None:
                if prompt == billed.prompt_tokens:
                    cached, write = billed.cached_prompt_tokens, billed.cache_write_tokens
                if completion == billed.completion_tokens:
                    reasoning = billed.reasoning_tokens
            if prompt is None:
                prompt = self.prompt_tokens
            if completion is None:
                completion = self.max_output_tokens
            if estimated is None:
                estimated = guessed or (self.prompt_estimated and reported_prompt is None)
            self._release_hold()
            self.record = self._record_usage(
                self.key,
                self.model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_prompt_tokens=cached,
                cache_write_tokens=write,
                reasoning_tokens=reasoning,
                # what was generated when said; unsaid, the hold (a call settled blind), or
                # none for a failed call
                images=images
                if images is not None
                else (self.images if usage is None and status == "ok" else 0),
                provider=self.provider,
                status=status,
                estimated=estimated,
                id=self.id,
                attrs=self.attrs,
            )
            return self.record

    def settle_stream(self, stream: StreamUsage, *, cancelled: bool = False) -> RecordedUsage:
        """Settle a streamed call: the usage it reported if it got that far, else what was
        reported before the end (Anthropic's input side) plus the content counted."""
        if stream.reported:
            # the usage comes last: a client that closes right after it (openai's Stream
            # stops at [DONE]) cancelled nothing
            return self.settle(stream.usage)
        return self.settle(
            stream.partial,
            completion_tokens=stream.completion_tokens(),
            status="cancelled" if cancelled else "ok",
            estimated=True,
        )

    def release(self) -> None:
        """The call was never made: drop the hold and record nothing."""
        with self._lock:
            if self.record is None:
                self._release_hold()

    def expired(self, now: float | None = None) -> bool:
        """Past its TTL at ``now`` (default: the client's clock)."""
        return (self._clock() if now is None else now) >= self.expires_at

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.record is None:
            if exc_type is None:
                self.settle()
            else:
                # The provider may have processed the prompt before failing: count it, estimated.
                self.settle(completion_tokens=0, status="error", estimated=True)
