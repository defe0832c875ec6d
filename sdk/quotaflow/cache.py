"""The decision cache: followed quota states plus this process's own usage, answered from memory.

``check`` is the request path: no I/O, no allocation beyond the result. It combines, for each
limit that binds the call (windows slide, see :mod:`quotaflow.windows`),

    counted = the stream's sliding count at publication, less its buckets expired since
    mine    = this process's usage in the window that the stream has not yet acknowledged

and denies when ``counted + mine + requested > limit`` (reason ``limit``). Acknowledgement comes
from the state's ``sources`` map: the event time of this instance's newest record the stream
has counted.

Budget shares bound the fleet's overshoot. Until the next state arrives, an instance with share
``s`` admits only while ``mine + requested <= s * (limit - counted)`` (reason ``share``
otherwise, retry in ~one propagation delay); with nothing unacknowledged, a call larger than
the share is admitted with probability share / size. The worker hands out shares summing to at
most 1, so instances holding the same state together admit no more than what that state left
(in expectation, for the chance admissions).

When the stream has not been heard from for longer than a policy's ``max_staleness``, that
policy's fail mode decides: ``open`` admits, ``closed`` denies, ``local`` enforces
``limit / expected_instances`` against this process's own usage only.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import add
from types import MappingProxyType
from typing import Any, Protocol

from quotaflow.counting import Pending, denied_until, expired, pending_of, pending_used
from quotaflow.decision import Decision, Reason
from quotaflow.headroom import Headroom, charge, gates_of, lefts_after
from quotaflow.policies import KEY_SCOPE, Binding, LimitSpec, PolicySet
from quotaflow.prices import ModelPrices
from quotaflow.state import EXPIRIES, QuotaState, WindowCounts
from quotaflow.units import unit_value
from quotaflow.windows import (
    MONTH,
    bucket_expires_at,
    bucket_start,
    months_of,
    sliding_floor,
    window_end,
    window_start,
)

Clock = Callable[[], float]


_EMPTY: MappingProxyType[str, int] = MappingProxyType({})

#: Seconds a caller denied by its budget share is told to wait: about one state's propagation.
SHARE_RETRY_AFTER = 0.05

#: Seconds a lost chance admission (a call larger than what is left of the share) holds when
#: no new state of the key comes: its state ends it sooner; this bounds a key without states.
DRAW_HOLD = 1.0

#: This process's calls of a key and model within one slot of 1/COALESCE_PER_SECOND seconds
#: (20 ms, the emitter's flush interval) are counted as one pending entry. A merged entry counts
#: within a window and until acknowledged as its newest call does: conservative by at most one
#: slot, never lenient.
COALESCE_PER_SECOND = 50

#: Seconds a headroom holds at most (it is exact until its own end, see quotaflow.headroom:
#: this only bounds how long a key idle since keeps it), and how many keys keep one.
HEADROOM_TTL = 60.0
MAX_HEADROOMS = 100_000


@dataclass(frozen=True, slots=True)
class LimitUsage:
    """One limit's standing: ``name`` as in decisions, its spec, what is used, when it resets."""

    name: str
    spec: LimitSpec
    used: int
    reset_at: float

    @property
    def remaining(self) -> int:
        return max(self.spec.limit - self.used, 0)


#: The prices a key's call of a model is charged at, at a time (None: unpriced, free).
CallPrices = Callable[[str, str, float], "ModelPrices | None"]

_new_decision = tuple.__new__


class CheckCall(Protocol):
    """The signature of :meth:`QuotaCache.check` (and of ``QuotaClient.check``, which is it)."""

    def __call__(
        self,
        key: str,
        model: str | None = None,
        *,
        tokens: int = 0,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        requests: int = 1,
        cached_prompt_tokens: int = 0,
        images: int = 0,
        cost_micros: int | None = None,
    ) -> Decision: ...


def _next_expiry(expiries: Iterable[tuple[float, ...]], now: float) -> float:
    """When the first of a state's bucket expiries still to come frees budget."""
    for x in expiries:
        if x[0] > now:
            return x[0]
    return math.inf


def _leaves_window(pending: Iterable[Pending], floor: float, size: int) -> float:
    """The earliest a pending call counted in a window (since ``floor``) leaves it."""
    return min((p[0] + size for p in pending if p[0] >= floor), default=math.inf)


class QuotaCache:
    """Thread-safe store of quota states and local usage; answers checks without I/O."""

    def __init__(
        self,
        policies: PolicySet,
        source: str,
        *,
        clock: Clock = time.time,
        pending_ttl: float = 120,
        rng: random.Random | None = None,
        priced: Callable[[str], bool] | None = None,
        prices: CallPrices | None = None,
        headroom: bool = True,
    ) -> None:
        self.policies = policies
        #: Whether a model has a price (policies with ``unpriced: reject`` deny those without).
        self._priced = priced
        #: Prices a call a money limit binds that came without its cost (see :meth:`check`).
        self._prices = prices
        self._random = (rng or random.Random()).random
        #: key -> when this instance last lost a chance admission on it (see _loses_draw)
        self._lost_draws: dict[str, float] = {}
        self.source = source
        self.clock = clock
        self.pending_ttl = pending_ttl
        self._states: dict[str, QuotaState] = {}
        self._pending: dict[str, list[Pending]] = {}
        # Reserved but not yet settled calls, per key and reservation id.
        self._held: dict[str, dict[str, Pending]] = {}
        # Own usage per (key, scope, window size): [window_start, *measures]. It survives
        # acknowledgement, for the ``local`` fail mode.
        self._own: dict[tuple[str, str, int], list[int]] = {}
        #: The live policy version decisions are made by (None: the policy file).
        self.policy_version: int | None = None
        #: Calls a shadow-mode policy would have denied, by limit (admitted all the same).
        self.shadow_denials: dict[str, int] = {}
        self._lock = threading.Lock()
        #: Local clock time the stream was last heard from (a state or a heartbeat).
        self.last_heard: float | None = None
        #: Instances the workers heard from lately (heartbeats): a new key's first share.
        self.fleet_instances = 0
        self._fleet: dict[str, int] = {}
        self.started_at = clock()
        # The fast path: per key and model, what may still be spent (quotaflow.headroom). Any
        # change that can shrink a headroom forgets it (under the lock, and counted in
        # _changes, so that a full decision racing the change does not leave an older one).
        self._headroom: dict[str, dict[str | None, Headroom]] = {}
        # The last limit denial per key, for a caller asking again with the same call:
        # (model, call, made, until, decision); forgotten with the headroom (see _decide).
        self._denied: dict[str, tuple[str | None, tuple[Any, ...], float, float, Decision]] = {}
        self._changes = 0
        #: False: every check is decided in full (to compare the two, in tests and benches).
        self.keeps_headroom = headroom

    @staticmethod
    def month(zone: str, ts: float) -> tuple[float, float]:
        """The billing month holding ``ts`` in ``zone``: ``(start, end)``."""
        return months_of(zone)(ts)

    # -- writes: the follower thread and record() -------------------------------------------

    def apply_state(self, state: QuotaState, *, live: bool = True) -> bool:
        """Install a newer state and drop the local usage it acknowledges; False if older.

        ``live`` states come from the stream now and prove the worker is alive; a snapshot read
        at start-up does not.
        """
        if live:
            self.mark_heard()
        current = self._states.get(state.key)
        if current is not None and current.published_at > state.published_at:
            return False
        with self._lock:
            self._states[state.key] = state
            self._forget(state.key)
            self._lost_draws.pop(state.key, None)  # a new state, a new chance
            acked = state.sources.get(self.source)
            if acked is not None:
                pending = self._pending.get(state.key)
                if pending:
                    kept = [p for p in pending if p[0] > acked]
                    if kept:
                        self._pending[state.key] = kept
                    else:
                        del self._pending[state.key]
        return True

    def keep_headrooms(self, keep: bool) -> None:
        """Answer from headrooms (True, the default) or decide every check in full (to
        compare the two); the headrooms kept so far are dropped either way."""
        with self._lock:
            self.keeps_headroom = keep
            self._forget()

    def _forget(self, key: str | None = None) -> None:
        """Drop a key's headrooms, or every key's (holding the lock): something may have
        changed them."""
        self._changes += 1
        if key is None:
            self._headroom.clear()
            self._denied.clear()
        else:
            self._headroom.pop(key, None)
            self._denied.pop(key, None)

    def mark_heard(self) -> None:
        self.last_heard = self.clock()

    def note_fleet(self, worker: str, instances: int) -> None:
        """Record how many instances a worker heard from lately (from its heartbeat)."""
        self._fleet[worker] = instances
        fleet = max(self._fleet.values())
        if fleet != self.fleet_instances:
            with self._lock:  # new keys' shares change with it
                self.fleet_instances = fleet
                self._forget()

    def add_usage(self, key: str, call: Pending) -> None:
        """Count this process's own call, ``(ts, model, *measures)``, until the stream
        acknowledges it (``record()`` builds the tuple: it is on the request path)."""
        bindings = self.policies.resolve(key, call[1])
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = [call]
            else:
                last = pending[-1]
                ts = call[0]
                if (
                    last[1] == call[1]
                    and last[0] <= ts
                    and int(last[0] * COALESCE_PER_SECOND) == int(ts * COALESCE_PER_SECOND)
                ):
                    # a hot key's calls of one slot count as one entry (checks scan pending
                    # entries: thousands a second made each check slower); stamped with the
                    # newest call's time, it is acknowledged once all of it is counted
                    pending[-1] = (ts, call[1], *map(add, last[2:], call[2:]))
                else:
                    pending.append(call)
            self._charge(key, call)
            for binding in bindings:
                # once per window, however many limits share it; only where the local fail
                # mode will read it
                for size in binding.local_windows:
                    self._add_own(key, binding, size, call)

    def _add_own(self, key: str, binding: Binding, size: int, call: Pending) -> None:
        """Add a call to this instance's own usage in the fixed window holding it."""
        ts = call[0]
        if size == MONTH:
            start = int(self.month(binding.policy.timezone, ts)[0])
        else:
            start = int(ts // size) * size
        slot = (key, binding.scope, size)
        own = self._own.get(slot)
        if own is None or own[0] < start:
            self._own[slot] = [start, *call[2:]]
        elif own[0] == start:
            self._own[slot] = [start, *map(add, own[1:], call[2:])]

    def _charge(self, key: str, call: Pending) -> None:
        """Take this process's call off the key's headrooms (holding the lock); a remembered
        denial of the key no longer has its figures. Counted in ``_changes`` even where the key
        has no headroom yet: a full decision of the key racing this call must not leave one
        (or a denial) that misses it."""
        self._changes += 1
        if self._denied:
            self._denied.pop(key, None)
        rooms = self._headroom.get(key)
        if rooms:
            model, measures = call[1], call[2:]
            for room_model, room in rooms.items():
                charge(room, room_model == model, measures)

    def hold(self, key: str, hold_id: str, call: Pending) -> None:
        """Count a reserved call, ``(ts, model, *measures)`` of its worst case, until it is
        settled or released."""
        with self._lock:
            self._held.setdefault(key, {})[hold_id] = call
            self._charge(key, call)

    def release(self, key: str, hold_id: str) -> bool:
        """Stop counting a reservation; False if it was not held."""
        with self._lock:
            held = self._held.get(key)
            call = held.pop(hold_id, None) if held else None
            if call is None:
                return False
            if not held:
                del self._held[key]
            self._give_back(key, call)
            return True

    def _give_back(self, key: str, call: Pending) -> None:
        """A released hold's measures back to the key's headrooms of its model (holding the
        lock): a reserve-then-settle call (the gateway's every call) keeps the fast path.

        Exact for a headroom of the hold's model whether the hold was charged to it or counted
        in its figures when it was made: each of its limits counts the call. A headroom of
        another model may have a model limit that never counted the hold, in a gate whose
        other limit did: giving it back there could open that gate too far, so it is dropped
        (its next check decides in full)."""
        self._changes += 1
        self._denied.pop(key, None)
        rooms = self._headroom.get(key)
        if not rooms:
            return
        model, back = call[1], tuple(-m for m in call[2:])
        for room_model in [m for m in rooms if m != model]:
            del rooms[room_model]
        room = rooms.get(model)
        if room is not None:
            charge(room, True, back)

    def expire(self) -> None:
        """Forget local usage older than ``pending_ttl`` that no state ever acknowledged."""
        cutoff = self.clock() - self.pending_ttl
        with self._lock:
            for key in list(self._pending):
                kept = [p for p in self._pending[key] if p[0] > cutoff]
                if len(kept) == len(self._pending[key]):
                    continue
                self._forget(key)  # a month counts pending usage older than the TTL
                if kept:
                    self._pending[key] = kept
                else:
                    del self._pending[key]
            now = self.clock()
            for slot in [s for s, own in self._own.items() if own[0] + s[2] <= now]:
                del self._own[slot]
            for key in [k for k, at in self._lost_draws.items() if not 0 <= now - at < DRAW_HOLD]:
                del self._lost_draws[key]

    def _loses_draw(self, key: str, now: float, want: int, allowance: float) -> bool:
        """A call larger than what is left of this instance's share, with nothing of its own
        unacknowledged: admitted with probability allowance / want, one draw per key until the
        next state of the key (or :data:`DRAW_HOLD` seconds). Callers told to retry in 50 ms
        would otherwise draw again on every retry, and the instance spend its share several
        times over in expectation."""
        lost_at = self._lost_draws.get(key)
        if lost_at is not None and 0 <= now - lost_at < DRAW_HOLD:
            return True
        if self._random() * want > allowance:
            self._lost_draws[key] = now
            return True
        return False

    # -- reads ---------------------------------------------------------------------------

    def state(self, key: str) -> QuotaState | None:
        return self._states.get(key)

    def pending_count(self, key: str) -> int:
        """Requests of this process the stream has not acknowledged yet."""
        return sum(p[2] for p in self._pending.get(key, ()))

    def __len__(self) -> int:
        return len(self._states)

    def adopt(
        self, policies: PolicySet, prices: CallPrices | None, version: int | None = None
    ) -> None:
        """Decide by ``policies`` from now on (a live policy ``version``); the states, pending
        usage and own usage kept so far stay: limits change, counts do not."""
        with self._lock:
            self.policies, self._prices, self.policy_version = policies, prices, version
            self._forget()

    def check(
        self,
        key: str,
        model: str | None = None,
        *,
        tokens: int = 0,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        requests: int = 1,
        cached_prompt_tokens: int = 0,
        images: int = 0,
        cost_micros: int | None = None,
    ) -> Decision:
        """May a call of this size proceed now? No I/O; about a microsecond.

        ``tokens`` is the call's expected total. Give ``prompt_tokens`` and ``completion_tokens``
        instead when prompt or completion limits apply; with only ``tokens``, all of it counts as
        prompt (the conservative reading for prompt limits). Where a money limit binds, the call
        is priced at the model's prices unless ``cost_micros`` is given.

        The request path: first the key's headroom (:mod:`quotaflow.headroom`), a comparison
        per unit; the full decision only where it has none or the call does not fit in it.
        """
        if prompt_tokens is None:
            prompt_tokens = tokens if completion_tokens is None else 0
        if completion_tokens is None:
            completion_tokens = 0
        now = self.clock()
        rooms = self._headroom.get(key)
        if rooms is not None:
            room = rooms.get(model)
            if room is not None and room.made <= now < room.until:
                gates = room.gates
                if cost_micros is None:
                    if room.gates_unpriced is not None:
                        # its price is bounded by its tokens: not priced unless read
                        gates = room.gates_unpriced
                    elif (rates := room.rates) is not None:
                        # ModelPrices.cost inlined, for flat prices (see headroom.check_rates)
                        r_in, r_out, r_req, d_read, r_img, half, whole = rates
                        cost_micros = (
                            prompt_tokens * r_in + completion_tokens * r_out + requests * r_req
                            + cached_prompt_tokens * d_read + images * r_img + half
                        ) // whole  # fmt: skip
                    elif room.prices is None:
                        cost_micros = 0
                    else:
                        cost_micros = room.prices.cost(
                            prompt_tokens, completion_tokens, cached_prompt_tokens, 0, 0, images,
                            requests,
                        )  # fmt: skip
                # the cost stays None where the gates bound it by tokens (none of them reads it)
                call: tuple[Any, ...] = (requests, prompt_tokens, completion_tokens,
                                         cached_prompt_tokens, images, cost_micros)  # fmt: skip
                for a, b, sign, bound in gates:
                    if (call[a] + sign * call[b] if sign else call[a]) >= bound:
                        break
                else:
                    last = self.last_heard
                    return _new_decision(Decision, (
                        True, key, model, room.reason, None, room.policy,
                        (room, room.spent, room.spent_elsewhere, call), 0.0, None,
                        None if last is None else now - last, None, None, None, None,
                        self.policy_version,
                    ))  # fmt: skip
        denied = self._denied.get(key)
        if denied is not None and denied[0] == model and denied[2] <= now < denied[3]:
            asked = (requests, prompt_tokens, completion_tokens, cached_prompt_tokens, images,
                     cost_micros)  # fmt: skip
            if denied[1] == asked:
                # the same call denied again, nothing changed since: the same answer, timed now
                d = denied[4]
                last = self.last_heard
                return _new_decision(Decision, (
                    *d[:7], d[8] - now, d[8], None if last is None else now - last, *d[10:],
                ))  # fmt: skip
        return self._decide(
            key, model, now, requests, prompt_tokens, completion_tokens, cached_prompt_tokens,
            images, cost_micros,
        )  # fmt: skip

    def _decide(
        self,
        key: str,
        model: str | None,
        now: float,
        requests: int,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int,
        images: int,
        cost_micros: int | None,
    ) -> Decision:
        """The full decision: every binding and limit, the fail modes, shadow policies. An
        admission leaves the key's headroom for the checks that follow.

        Written for speed (precomputed limit rows, no helper calls in the common case) rather
        than brevity: a key's first check, and every check near a limit, comes here.
        """
        changes = self._changes
        bindings = self.policies.resolve(key, model)
        last = self.last_heard
        age = None if last is None else now - last
        if not bindings:
            self._remember(key, model, changes, Headroom(
                now, now + HEADROOM_TTL, [], (), (), (), (), "no_policy", None, None,
            ))  # fmt: skip
            return Decision(True, key, model, "no_policy", None, None, _EMPTY, 0.0, None, age,
                            None, None, None, None, self.policy_version)  # fmt: skip
        # where a money limit binds, the model's prices (the headroom keeps them for the calls
        # that come without their cost)
        prices: ModelPrices | None = None
        if self._prices is not None and model is not None:
            for binding in bindings:
                if binding.money:
                    prices = self._prices(key, model, now)
                    break
        asked = (requests, prompt_tokens, completion_tokens, cached_prompt_tokens, images,
                 cost_micros)  # fmt: skip
        if cost_micros is None:
            cost_micros = 0 if prices is None else prices.cost(
                prompt_tokens, completion_tokens, cached_prompt_tokens, 0, 0, images, requests
            )  # fmt: skip
        call = (requests, prompt_tokens, completion_tokens, cached_prompt_tokens, images,
                cost_micros)  # fmt: skip
        silent_for = now - (self.started_at if last is None else last)
        state = self._states.get(key)
        pending: list[Pending] | None = self._pending.get(key)
        held = self._held.get(key)
        if held:
            pending = [*(pending or ()), *held.values()]
        share = self._share(state)
        remaining: dict[str, int] = {}
        # (reason, name, binding, reset_at, used, limit, want)
        deny: tuple[Reason, str, Binding, float, int, int, int] | None = None
        stale_reason: Reason | None = None
        shadow: str | None = None  # what a shadow-mode policy would have denied by
        # the headroom an admission leaves: until when it holds, and per limit its form, what
        # is left before this call and the bound of its gate (share included)
        until = now + HEADROOM_TTL
        next_turn = math.inf  # when a denial's reset moves (see _remember_denial)
        forms: list[tuple[int, int, int]] = []
        lefts: list[int] = []
        bounds: list[int] = []
        names: list[str] = []
        keywide: list[bool] = []
        for binding in bindings:
            policy = binding.policy
            # shadow mode (enforce: false): decided like any policy, but what would deny is
            # only noted (shadow) and the call goes on to the next policy
            enforce = policy.enforce
            if (
                policy.unpriced == "reject"
                and model is not None
                and self._priced is not None
                and not self._priced(model)
            ):
                if not enforce:
                    shadow = shadow or "unpriced"
                    continue
                return Decision(
                    False, key, model, "unpriced", "unpriced", policy.name, _EMPTY, 0.0,
                    None, age, None, None, None, None, self.policy_version,
                )  # fmt: skip
            stale = silent_for > policy.max_staleness
            if stale:
                if policy.fail_mode == "open":
                    stale_reason = stale_reason or "stale_open"
                    continue
                if policy.fail_mode == "closed":
                    if not enforce:
                        shadow = shadow or "stale"
                        continue
                    return Decision(
                        False, key, model, "stale_closed", "stale", policy.name, _EMPTY,
                        policy.max_staleness, None, age, None, None, None, None,
                        self.policy_version,
                    )  # fmt: skip
                stale_reason = "stale_local"
            else:
                # the fail mode takes over once the stream has been silent this long
                until = min(until, now - silent_for + policy.max_staleness)
            windows = state.scopes.get(binding.scope) if state is not None else None
            scope = binding.scope
            shared = policy.budget_shares and share < 1.0 and not stale
            # the unit's value is measure a, plus sign x measure b where it combines two
            for name, unit, size, limit, bucket, a, b, sign in binding.rows:
                mine = 0
                if size == MONTH:  # a billing period, not a sliding window
                    period = self.month(policy.timezone, now)
                    until = min(until, period[1])
                    counted, mine = self._month_used(
                        key, windows, pending, scope, unit, period[0], stale
                    )
                    if stale:
                        limit = limit // policy.expected_instances
                elif stale:
                    start = window_start(now, size)
                    counted = self._own_used(key, scope, unit, size, start)
                    limit = limit // policy.expected_instances
                else:
                    # the stream's sliding count, less what expired since it was published
                    counted = 0
                    if windows is not None:
                        w = windows.get(size)
                        if w is not None:
                            counted = w[a + 1] + sign * w[b + 1] if sign else w[a + 1]
                            expiries = w[-1]  # a window ends with its expiries
                            if expiries:
                                if expiries[0][0] <= now:
                                    counted -= expired(expiries, unit, now)
                                until = min(until, _next_expiry(expiries, now))
                    if pending:
                        floor = (now // bucket) * bucket - size
                        mine = pending_used(pending, scope, a, b, sign, floor)
                        until = min(until, _leaves_window(pending, floor, size))
                used = counted + mine
                want = call[a] + sign * call[b] if sign else call[a]
                left = limit - used - want
                remaining[name] = left if left > 0 else 0
                bound = limit - used  # the headroom's gate: a call fits below it
                if left < 0 or (want == 0 and limit <= used):
                    reset_at = (
                        self.month(policy.timezone, now)[1] if size == MONTH
                        else float(window_end(now, size)) if stale
                        else denied_until(
                            windows, pending, scope, unit, size, limit - max(want, 1), now
                        )
                    )  # fmt: skip
                    if not enforce:
                        shadow = shadow or name
                    else:
                        if size != MONTH and not stale:
                            # nothing listed frees in time: the reset is a window after the
                            # current bucket, so it moves when the bucket ends
                            turn = (now // bucket) * bucket + bucket
                            if reset_at >= turn + size and turn < next_turn:
                                next_turn = turn
                        if deny is None or deny[0] != "limit" or reset_at > deny[3]:
                            deny = ("limit", name, binding, reset_at, used, limit, want)
                elif shared:
                    allowance = share * (limit - counted) - mine
                    bound = min(bound, int(allowance // 1) + 1)
                    # Within the limit, but past this instance's share of what is left: wait
                    # for the next state rather than race the rest of the fleet for it. With
                    # nothing unacknowledged, a share smaller than the call admits it with
                    # probability share / call, so the fleet still spends its last calls (in
                    # expectation, exactly its shares) instead of leaving ~one call per
                    # instance unused; one chance per instance until the stream catches up.
                    if (
                        deny is None
                        and want > allowance
                        and (mine or allowance <= 0 or self._loses_draw(key, now, want, allowance))
                    ):
                        if enforce:
                            deny = ("share", name, binding, now + SHARE_RETRY_AFTER, used,
                                    limit, want)  # fmt: skip
                        else:
                            shadow = shadow or name
                names.append(name)
                forms.append((a, b, sign))
                lefts.append(limit - used)
                bounds.append(bound)
                keywide.append(scope == KEY_SCOPE)
        view = MappingProxyType(remaining)
        if deny is not None:
            reason, name, d_binding, reset_at, used, ceiling, want = deny
            decision = Decision(
                False, key, model, reason, name, d_binding.policy.name, view,
                reset_at - now, reset_at, age, used, ceiling, want, None, self.policy_version,
            )  # fmt: skip
            if reason == "limit" and stale_reason is None:
                until = min(until, next_turn)
                if prices is not None:
                    until = min(until, prices.valid_until)
                self._remember_denial(key, model, asked, changes, now, until, decision)
            return decision
        if shadow is not None:
            self.shadow_denials[shadow] = self.shadow_denials.get(shadow, 0) + 1
            return Decision(
                True, key, model, stale_reason or "ok", None, bindings[0].policy.name, view,
                0.0, None, age, None, None, None, shadow, self.policy_version,
            )  # fmt: skip
        if stale_reason is None:
            if prices is not None:
                until = min(until, prices.valid_until)
            self._remember(key, model, changes, Headroom(
                now, until, gates_of(forms, bounds), tuple(names), tuple(forms), tuple(lefts),
                tuple(keywide), "ok", bindings[0].policy.name, prices,
            ))  # fmt: skip
        return Decision(
            True, key, model, stale_reason or "ok", None, bindings[0].policy.name, view,
            0.0, None, age, None, None, None, None, self.policy_version,
        )  # fmt: skip

    def _remember(self, key: str, model: str | None, changes: int, room: Headroom) -> None:
        """Keep a full decision's headroom, unless the key's counts changed while it was made
        (its headroom would miss that change)."""
        if not self.keeps_headroom:
            return
        with self._lock:
            if self._changes != changes:
                return
            rooms = self._headroom.get(key)
            if rooms is None:
                if len(self._headroom) >= MAX_HEADROOMS:
                    self._headroom.clear()  # bounded memory: a miss costs one full decision
                self._headroom[key] = {model: room}
            else:
                rooms[model] = room

    def _remember_denial(
        self,
        key: str,
        model: str | None,
        asked: tuple[Any, ...],
        changes: int,
        now: float,
        until: float,
        decision: Decision,
    ) -> None:
        """Keep a limit denial for the same call asked again (a caller retrying, a queue
        polling): it is the full decision's answer until ``until``, the first moment that
        decision could differ (a listed bucket expiring, the current one ending where a reset
        is read as a window after it, nothing freeing in time; pending usage leaving a window,
        the stream deemed silent, a month or a price ending), and while nothing that changes the
        key's counts happens (each forgets it, as it forgets the headroom). Share denials are
        not kept: they hold for a moment and their chance admissions are drawn afresh."""
        if not self.keeps_headroom:
            return
        with self._lock:
            if self._changes != changes:
                return
            if len(self._denied) >= MAX_HEADROOMS:
                self._denied.clear()  # bounded memory: a miss costs one full decision
            self._denied[key] = (model, asked, now, until, decision)

    def _month_used(
        self,
        key: str,
        windows: Mapping[int, WindowCounts] | None,
        pending: Iterable[Pending] | None,
        scope: str,
        unit: int,
        start: float,
        stale: bool,
    ) -> tuple[int, int]:
        """(counted, mine) of one unit in the billing month beginning at ``start``: the
        stream's count if its state is of this month (a new month starts from nothing), and
        this process's unacknowledged usage since; stale, this instance's own usage."""
        if stale:
            return self._own_used(key, scope, unit, MONTH, int(start)), 0
        counted = 0
        w = windows.get(MONTH) if windows is not None else None
        if w is not None and w[0] == start:
            counted = unit_value(unit, w, 1)
        return counted, pending_of(pending, scope, unit, start) if pending else 0

    def _share(self, state: QuotaState | None) -> float:
        """This instance's share of a key's remaining budget until the next state."""
        if state is not None and state.shares:
            own = state.shares.get(self.source)
            # a newcomer the stream has not heard from on this key yet
            return own if own is not None else 1.0 / (len(state.shares) + 1)
        fleet = self.fleet_instances
        return 1.0 / fleet if fleet > 1 else 1.0

    def usage(self, key: str, model: str | None = None) -> tuple[LimitUsage, ...]:
        """Every limit that binds ``key`` (and ``model``) with what is used of it now, as the
        stream and this process see it; for headers and dashboards, not the request path.
        ``reset_at`` is when all of it will have freed if no more is used."""
        now = self.clock()
        rooms = self._headroom.get(key)
        room = rooms.get(model) if rooms is not None else None
        if room is not None and room.made <= now < room.until:
            known = self._usage_from(room, key, model, now)
            if known is not None:
                return known
        state = self._states.get(key)
        pending: list[Pending] = [*self._pending.get(key, ()), *self._held.get(key, {}).values()]
        rows = []
        for binding in self.policies.resolve(key, model):
            windows = state.scopes.get(binding.scope) if state is not None else None
            # rows are the specs precomputed, in the same order
            for spec, (name, unit, size, *_) in zip(
                binding.policy.specs, binding.rows, strict=True
            ):
                if size == MONTH:
                    start, end = self.month(binding.policy.timezone, now)
                    counted, mine = self._month_used(
                        key, windows, pending, binding.scope, unit, start, False
                    )
                    rows.append(LimitUsage(name, spec, counted + mine, end))
                    continue
                current = bucket_start(now, size)
                used = pending_of(pending, binding.scope, unit, sliding_floor(now, size))
                w = windows.get(size) if windows is not None else None
                if w is not None:
                    used += unit_value(unit, w, 1) - expired(w[EXPIRIES], unit, now)
                rows.append(LimitUsage(name, spec, used, bucket_expires_at(current, size)))
        return tuple(rows)

    def _usage_from(
        self, room: Headroom, key: str, model: str | None, now: float
    ) -> tuple[LimitUsage, ...] | None:
        """:meth:`usage` read off a live headroom, which holds what each limit had left when it
        was made and what was spent since, exact until it expires: no scan of the pending
        usage (a gateway answers every call with these figures). None where its limits are
        not the bindings' (a shadow policy it skipped): read in full then."""
        lefts = lefts_after(room, room.spent, room.spent_elsewhere)
        names = room.names
        rows = []
        i = 0
        for binding in self.policies.resolve(key, model):
            for spec, (name, _, size, limit, *_) in zip(
                binding.policy.specs, binding.rows, strict=True
            ):
                if i >= len(names) or names[i] != name:
                    return None
                reset_at = (
                    self.month(binding.policy.timezone, now)[1] if size == MONTH
                    else bucket_expires_at(bucket_start(now, size), size)
                )  # fmt: skip
                rows.append(LimitUsage(name, spec, limit - lefts[i], reset_at))
                i += 1
        return tuple(rows) if i == len(names) else None

    def _own_used(self, key: str, scope: str, unit: int, size: int, start: int) -> int:
        """This instance's own usage of one unit in the window starting at ``start``."""
        own = self._own.get((key, scope, size))
        if own is None or own[0] != start:
            return 0
        return unit_value(unit, own, 1)
