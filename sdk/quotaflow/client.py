"""QuotaClient: the SDK surface a service embeds.

    with QuotaClient() as quota:
        decision = quota.check("team-alpha", model="gpt-4o", tokens=1200)
        if decision.allowed:
            response = call_llm(...)
            quota.record("team-alpha", "gpt-4o", prompt_tokens=..., completion_tokens=...)

``check`` and ``record`` never do I/O and never block, so they are safe to call directly from
asyncio code. Only opening and closing touch the network: use ``async with QuotaClient()`` (or
``await client.aclose()``) in async services, which runs them in a worker thread.

A client opens itself on its first ``check``, ``record`` or ``reserve`` (starting the emitter
and the follower, which connect in their own threads: the call itself still does no I/O), so a
check never answers from a cache that nothing fills. A closed client raises
:class:`ClientStateError`.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from quotaflow._exceptions import ClientStateError, QuotaExceeded, RecordError
from quotaflow.cache import CheckCall, Clock, QuotaCache
from quotaflow.emitter import UsageEmitter
from quotaflow.follower import DecisionsFollower
from quotaflow.ids import IdMinter
from quotaflow.journal import Journal
from quotaflow.policies import Limits, PolicySet, load_policies
from quotaflow.policy_log import PolicyVersion
from quotaflow.policy_topic import PolicyFollower
from quotaflow.prices import (
    ModelPrices,
    PriceTable,
    check_unpriced_fallbacks,
    dollars,
    load_price_table,
)
from quotaflow.pricing import IMAGE_QUALITY, IMAGE_SIZE, CallPricer
from quotaflow.record import RecordedUsage, Status, describe_validation_error, make_record
from quotaflow.reservation import Reservation
from quotaflow.settings import QuotaflowSettings, load_settings
from quotaflow.tokens import count_request, operation_name, request_kind
from quotaflow.tokens import max_output_tokens as request_max_output_tokens
from quotaflow.transports import KafkaTransport, Transport

log = logging.getLogger(__name__)


class ClientState(enum.Enum):
    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


_OPENED = ClientState.OPENED


def _checked_record(*fields: Any) -> RecordedUsage:
    """:func:`make_record`, its validation error raised as the :class:`RecordError` callers
    catch (naming the field, never repeating the value). ``record()`` inlines the same, being
    the request path."""
    try:
        return make_record(*fields)
    except ValidationError as exc:
        raise RecordError(f"usage record: {describe_validation_error(exc)}") from None


class QuotaClient:
    """Answers quota checks from memory and emits usage records without blocking."""

    def __init__(
        self,
        settings: QuotaflowSettings | None = None,
        *,
        policies: PolicySet | None = None,
        prices: PriceTable | None = None,
        clock: Clock = time.time,
        transport: Transport | None = None,
        follow: bool = True,
    ) -> None:
        self.settings = settings or load_settings()
        self.policies = policies or load_policies(self.settings.policies_file)
        self.prices = prices or load_price_table(self.settings.prices_file)
        check_unpriced_fallbacks(self.policies, self.prices)
        self.pricer = CallPricer(self.prices, self.policies)
        # record() reads resolved prices straight from the table's cache (one dict lookup)
        self._resolved_prices = self.pricer.cache
        # whether reserve() holds a worst-case cost (only where some policy limits money)
        self._money = self.policies.money
        self._price_version = self.pricer.version
        client = self.settings.client
        self.source = client.source
        self.clock = clock
        self.cache = QuotaCache(
            self.policies,
            self.source,
            clock=clock,
            pending_ttl=client.pending_ttl,
            priced=lambda model: self.prices.lookup(model) is not None,
            prices=self._call_prices if self.policies.money else None,
        )
        self._check = self.cache.check
        kafka_conf = self.settings.kafka.confluent_config()
        self._transport = transport
        self._kafka_conf = kafka_conf
        self.emitter: UsageEmitter | None = None
        self.follower: DecisionsFollower | None = None
        if follow:
            self.follower = DecisionsFollower(
                self.cache,
                kafka_conf,
                self.settings.topics.decisions,
                redis_url=self.settings.redis.url,
                redis_kwargs=self.settings.redis.client_kwargs(),
                states_hash=self.settings.redis.states_hash,
                warm_start=client.warm_start,
                fetch_max_wait_ms=client.fetch_max_wait_ms,
            )
        #: The live policy version in force (None: the policy file, no version adopted yet).
        self.policy_version: int | None = None
        self.policy_lag: float | None = None
        self.overrides_in_force = 0
        self._file_policies = self.policies
        self.policy_follower: PolicyFollower | None = None
        if follow and policies is None and self.settings.policies.follow:
            self.policy_follower = PolicyFollower(self.settings, self._adopt)
        self.state = ClientState.UNOPENED
        self._last_ts = 0.0
        self._reservations: dict[str, Reservation] = {}
        #: This instance's record ids (the SDK's id format, see quotaflow.ids).
        self.ids = IdMinter()
        self._id_head, self._id_counter = self.ids.head, self.ids.counter
        self._next_expiry = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> QuotaClient:
        """Start the emitter and follower threads. Called by ``with`` and on first use."""
        if self.state is ClientState.CLOSED:
            raise ClientStateError("QuotaClient is closed; create a new one")
        if self.state is ClientState.OPENED:
            return self
        c = self.settings.client
        self.emitter = UsageEmitter(
            self._transport or KafkaTransport(self._kafka_conf),
            self.settings.topics.usage,
            max_batch=c.max_batch,
            flush_interval=c.flush_interval,
            max_buffered=c.max_buffered,
            journal=Journal(c.journal_dir / c.source, c.journal_max_bytes, c.journal_fsync)
            if c.journal
            else None,
        )
        if self.settings.otel.enabled:
            from quotaflow.otel import UsageMetrics  # the optional extra: imported only here

            self.emitter.observers.append(UsageMetrics().observe)
        self.emitter.start()
        if self.follower is not None:
            self.follower.start()
        if self.policy_follower is not None:
            self.policy_follower.start()
        self.state = ClientState.OPENED
        return self

    def _adopt(
        self, version: PolicyVersion | None, overrides: dict[tuple[str, str | None], Limits]
    ) -> None:
        """Enforce the live policies (called from the policies follower's thread): a version
        (else the file) with the overrides in force. Each check() reads the policy set once,
        so a call sees the old set or the new, never both. Counters are the worker's and stay
        as they are: no window resets."""
        base = version.policies if version is not None else self._file_policies
        policies = PolicySet(base.policies, base.source, overrides) if overrides else base
        check_unpriced_fallbacks(policies, self.prices)  # raises: the follower keeps the old
        pricer = CallPricer(self.prices, policies)
        self.pricer, self._resolved_prices = pricer, pricer.cache
        self._money = policies.money
        number = version.version if version is not None else None
        self.cache.adopt(policies, self._call_prices if policies.money else None, number)
        self.policies = policies
        if number != self.policy_version and version is not None:
            #: Seconds from the version's publication to this instance enforcing it.
            self.policy_lag = max(time.time() - version.time, 0.0)
            log.info("policies: version %d in force (%s, by %s)", version.version,
                     version.message or "no message", version.author)  # fmt: skip
        self.policy_version = number
        self.overrides_in_force = len(overrides)

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Block until the follower has warm-started and is consuming; False on timeout."""
        deadline = time.monotonic() + timeout
        if self.follower is not None and not self.follower.ready.wait(timeout):
            return False
        if self.policy_follower is not None:
            # the live policies, if the topic has any: a few ms; without the topic, the file
            self.policy_follower.caught_up.wait(max(min(deadline - time.monotonic(), 5.0), 0))
        return True

    def close(self, timeout: float = 10.0) -> int:
        """Flush buffered usage and stop; returns messages still undelivered (0 is success)."""
        if self.state is not ClientState.OPENED:
            self.state = ClientState.CLOSED
            return 0
        # Reservations never settled are settled as estimated: their usage must not be lost.
        for reservation in list(self._reservations.values()):
            reservation.settle()
        self.state = ClientState.CLOSED
        if self.follower is not None:
            self.follower.stop()
        if self.policy_follower is not None:
            self.policy_follower.stop()
        assert self.emitter is not None
        return self.emitter.close(timeout)

    async def aclose(self, timeout: float = 10.0) -> int:
        """``close()`` off the event loop."""
        return await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> QuotaClient:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> QuotaClient:
        return await asyncio.to_thread(self.open)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- request path -------------------------------------------------------------------------

    @property
    def check(self) -> CheckCall:
        """``check(key, model=None, *, tokens=0, prompt_tokens=None, completion_tokens=None,
        requests=1, cached_prompt_tokens=0, images=0, cost_micros=None) -> Decision``: may a
        call of this size proceed now? No I/O; about a microsecond (see QuotaCache.check).

        A property handing out the cache's own ``check``: the request path pays one call, not
        two (a Python call with keywords costs about as much as the fast path itself).
        """
        if self.state is not _OPENED:
            self.open()
        return self._check

    def _call_prices(self, key: str, model: str, now: float) -> ModelPrices | None:
        """The prices ``check()`` charges a key's call of a model at (its policy's fallback
        for a model the table does not know)."""
        return self.pricer.resolve(key, model, None, now)[0]

    def record(
        self,
        key: str,
        model: str,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_prompt_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        images: int = 0,
        requests: int = 1,
        cost_micros: int | None = None,
        provider: str | None = None,
        user: str | None = None,
        estimated: bool = False,
        status: Status = "ok",
        id: str | None = None,
        ts: float | None = None,
        attrs: Mapping[str, str] | None = None,
    ) -> RecordedUsage:
        """Count one call locally at once and queue its usage record; never blocks.

        Cached and cache-write tokens are parts of ``prompt_tokens``, reasoning tokens part of
        ``completion_tokens`` (read a provider's usage with :func:`quotaflow.billed_usage`).
        The call is priced from the price table unless ``cost_micros`` is given; a model the
        table does not know is priced as its policy's ``unpriced`` says. Raises
        :class:`RecordError` naming the field if the record breaks the v2 contract.
        """
        if self.state is not _OPENED:
            self.open()
        if ts is None:
            # Monotonic per instance: the stream acknowledges our usage by our newest timestamp.
            ts = max(self.clock(), self._last_ts + 1e-6)
            self._last_ts = ts
        prices = price_version = priced_as = None
        if cost_micros is None:
            price_version = self._price_version  # kept only if the call is priced
            prices = self._resolved_prices.get((model, provider))
            if prices is None or not prices.valid_from <= ts < prices.valid_until:
                # first call of a model (or of a day), or one the table does not know
                prices, priced_as = self.pricer.resolve(
                    key, model, provider, ts, attrs if images else None
                )
        # _checked_record and IdMinter inline: two calls were ~0.5 us of record()'s ~10
        try:
            record = make_record(
                id or f"{self._id_head}{next(self._id_counter):x}",
                ts, key, model, requests, prompt_tokens, completion_tokens, estimated, status,
                self.source, dict(attrs) if attrs else {}, cached_prompt_tokens,
                cache_write_tokens, reasoning_tokens, images, cost_micros, provider,
                price_version, user, prices, priced_as,
            )  # fmt: skip
        except ValidationError as exc:
            raise RecordError(f"usage record: {describe_validation_error(exc)}") from None
        self.cache.add_usage(
            key,
            (ts, model, requests, prompt_tokens, completion_tokens, cached_prompt_tokens, images,
             record.cost_micros or 0),
        )  # fmt: skip
        assert self.emitter is not None
        self.emitter.emit(record)
        return record

    def reserve(
        self,
        key: str,
        model: str,
        request: Mapping[str, Any] | None = None,
        *,
        prompt_tokens: int | None = None,
        max_output_tokens: int | None = None,
        images: int = 0,
        attrs: Mapping[str, str] | None = None,
        kind: str | None = None,
        provider: str | None = None,
    ) -> Reservation:
        """Admit a call by its estimated prompt tokens plus its output ceiling (and ``images``),
        and hold that amount, and its price at the model's prices, until it is settled; raises
        :class:`QuotaExceeded` if it does not fit. Settling charges the real usage and cost and
        gives the rest back.

        ``request`` is the request body; its prompt is
        counted locally and its ``max_completion_tokens``/``max_tokens`` is the ceiling, else
        the key's policy's ``default_max_output_tokens``. Embeddings hold no output tokens.
        ``kind`` says which API the body is for where its fields cannot (``responses``,
        ``messages`` for Anthropic's, ``images``); OpenAI chat, completions and embeddings are
        told apart by their fields. ``attrs`` label the settled record; with a request body,
        ``operation`` says which API was called (OpenTelemetry's GenAI names). ``provider`` is
        recorded and reads the usage the call reports in that provider's shape.
        """
        self._expire_reservations()
        estimated = False
        body = dict(request or {})
        if prompt_tokens is None:
            if body:
                try:
                    count = count_request(body, model, kind)
                except ValueError as exc:
                    raise RecordError(f"cannot count the request's prompt: {exc}") from None
                prompt_tokens, estimated = count.tokens, count.estimated
            else:
                prompt_tokens = 0
        if max_output_tokens is None:
            max_output_tokens = request_max_output_tokens(body)
        if max_output_tokens is None:
            if body and (kind or request_kind(body)) in ("embedding", "images"):
                max_output_tokens = 0
            else:
                bindings = self.policies.resolve(key, model)
                max_output_tokens = bindings[0].policy.default_max_output_tokens if bindings else 0
        labels = dict(attrs or {})
        if body and "operation" not in labels:
            labels["operation"] = operation_name(body, kind)
        if images:
            # what an image's price depends on, kept on the record so the audit can explain it
            for label, field in ((IMAGE_SIZE, "size"), (IMAGE_QUALITY, "quality")):
                value = body.get(field)
                if isinstance(value, str) and 0 < len(value) <= 32 and label not in labels:
                    labels[label] = value
        reservation_id = uuid.uuid4().hex
        # The record settle() falls back to must be valid now: a call is admitted only if its
        # usage can be recorded (a gateway forwards nothing it could not count).
        _checked_record(
            reservation_id, self.clock(), key, model, 1, prompt_tokens, max_output_tokens,
            estimated, "ok", self.source, labels,
        )  # fmt: skip
        now = self.clock()
        # the worst case: the whole prompt uncached and every output token used (priced only
        # where some policy limits money: nothing else reads it)
        cost = (
            self.pricer.cost(
                key, model, now, prompt_tokens, max_output_tokens, images=images, attrs=labels
            )
            if self._money
            else 0
        )
        decision = self.check(
            key, model, prompt_tokens=prompt_tokens, completion_tokens=max_output_tokens,
            images=images, cost_micros=cost,
        )  # fmt: skip
        if decision.reason == "unpriced":
            nearest = ", ".join(self.prices.nearest(model)) or "none"
            raise QuotaExceeded(
                f"{key}: model {model!r} has no price, and policy {decision.policy!r} rejects "
                f"unpriced models (unpriced: reject); nearest known: {nearest}",
                retry_after=0.0,
                limit="unpriced",
                decision=decision,
            )
        if not decision.allowed:
            raise QuotaExceeded(
                f"{key}: {decision.limit} would be exceeded by {prompt_tokens} prompt + "
                f"{max_output_tokens} output tokens"
                f"{f' (${dollars(cost)})' if self._money else ''}; "
                f"retry after {decision.retry_after:.1f}s",
                retry_after=decision.retry_after,
                limit=decision.limit,
                decision=decision,
            )
        reservation = Reservation(
            reservation_id,
            key,
            model,
            prompt_tokens,
            max_output_tokens,
            estimated,
            now + self.settings.client.reservation_ttl,
            decision,
            record=self.record,
            release=functools.partial(self._end_reservation, key, reservation_id),
            clock=self.clock,
            attrs=labels,
            provider=provider,
            images=images,
        )
        self._reservations[reservation.id] = reservation
        self.cache.hold(
            key, reservation.id, (now, model, 1, prompt_tokens, max_output_tokens, 0, images, cost)
        )
        return reservation

    def _end_reservation(self, key: str, reservation_id: str) -> None:
        """A reservation settled or released: its hold no longer counts."""
        self.cache.release(key, reservation_id)
        self._reservations.pop(reservation_id, None)

    def _expire_reservations(self) -> None:
        """Settle (as estimated) reservations past their TTL; checked at most once a second."""
        now = self.clock()
        if now < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        for reservation in list(self._reservations.values()):
            if reservation.expired(now):
                reservation.settle()

    @property
    def open_reservations(self) -> int:
        return len(self._reservations)

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        emitter = self.emitter
        follower = self.follower
        return {
            "state": self.state.value,
            "source": self.source,
            "keys_cached": len(self.cache),
            "records_buffered": emitter.buffered if emitter else 0,
            "records_sent": emitter.sent_records if emitter else 0,
            "messages_sent": emitter.sent_messages if emitter else 0,
            "records_overflowed": emitter.overflowed if emitter else 0,
            "states_applied": follower.states_applied if follower else 0,
            "warm_started_keys": follower.warm_started_keys if follower else 0,
            "follower_error": follower.error if follower else None,
            "policy_version": self.policy_version,
            "policy_lag_s": self.policy_lag,
            "shadow_denials": dict(self.cache.shadow_denials),
            "overrides_in_force": self.overrides_in_force,
        }
