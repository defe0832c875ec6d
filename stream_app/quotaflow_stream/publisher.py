"""The state publisher: which keys' quota states go out, when, and within what share of time.

Every ``publish_interval`` (:meth:`StatePublisher.publish_dirty`) the states of the keys whose
usage changed go to the decisions topic and the Redis snapshot, once per key however many
messages touched it, oldest change first. Usage that finds publication idle (nothing published
for an interval) goes out as soon as it is folded (:meth:`StatePublisher.publish_if_idle`),
without waiting for the next tick: a quiet key's state reaches the fleet up to an interval
sooner, and a busy worker still publishes at most once per interval and within its share of
time. Under a backlog thousands of keys change between ticks: a tick stops within
:data:`PUBLISH_SLICE` of its interval (the rest stay dirty, oldest first next time) and, while
records are being folded, the next one waits so that publication takes at most
:data:`PUBLISH_SHARE` of the worker's time, so busy keys' states coalesce instead of starving
the aggregation. Once nothing was folded since the last tick (the backlog is done) the keys
still due go out tick after tick: the fleet gets the final counts as soon as the worker is
free, not at the backlog's pace (see ``bench stream``'s ``states_current_after_s``).

Every ``heartbeat_interval`` (:meth:`StatePublisher.refresh`) active keys are
re-published once ``refresh_interval`` has passed (windows roll over without new usage) and a
heartbeat goes to every decisions partition, so followers can tell a quiet worker from a dead
one.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

from quotaflow.policies import KEY_SCOPE, PolicySet
from quotaflow.settings import WorkerSettings
from quotaflow.state import HEARTBEAT_KEY, QuotaState, heartbeat_json
from quotaflow_stream.alerts import crossed
from quotaflow_stream.counters import Counters
from quotaflow_stream.entry import Entry
from quotaflow_stream.evaluate import ACTIVE_SOURCE_SECONDS, evaluate

log = logging.getLogger(__name__)

#: Publication may take at most this share of the worker's time: under a backlog the states of
#: busy keys coalesce over longer ticks instead of starving the aggregation.
PUBLISH_SHARE = 0.2

#: Why a key's state is published: new usage (the decisions SDKs wait for), a refresh of an
#: active key (windows roll over without usage), recovery (every key of partitions taken over),
#: a policy change. Only ``usage`` publications are decisions: their latency is measured.
REASONS = ("usage", "refresh", "recovery", "policy")

#: Longest run of publications in one tick, as a share of the publication interval (Faust
#: warns of a timer that overruns its interval; the event loop stays responsive).
PUBLISH_SLICE = 0.8

#: The policy label of usage of keys no key-wide policy covers.
NO_POLICY = "(none)"


class Entries(Protocol):
    """What the publisher reads of the store (an :class:`~.store.AggregateStore`)."""

    entries: dict[str, Entry]
    #: Keys changed since their last save (alert marks join them).
    unsaved: set[str]

    def get(self, key: str) -> Entry | None: ...

    def keys_in(self, partitions: set[int]) -> list[str]: ...


class StateSink(Protocol):
    """Where states go: the bulk producer (decisions topic) ..."""

    def send(self, topic: str, key: bytes, value: bytes, partition: int | None = None) -> None: ...

    def poll(self) -> None: ...


class Snapshot(Protocol):
    """... and the Redis snapshot."""

    def put(self, key: str, payload: bytes) -> None: ...


class HeartbeatTopic(Protocol):
    async def send(self, *, key: bytes, value: bytes, partition: int) -> Any: ...


class StatePublisher:
    """Publishes the states of changed and active keys, and the worker's heartbeats."""

    def __init__(
        self,
        settings: WorkerSettings,
        policies: PolicySet,
        store: Entries,
        output: StateSink,
        snapshot: Snapshot,
        heartbeats: HeartbeatTopic,
        *,
        decisions_topic: str,
        alerts_topic: str | None = None,
        partitions: int,
        counters: Counters,
        ready: Callable[[], bool],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.policies = policies
        #: The live policy version in force, said in heartbeats (None: the policy file).
        self.policy_version: int | None = None
        self.store = store
        self.output = output
        self.snapshot = snapshot
        self.heartbeats = heartbeats
        self.decisions_topic = decisions_topic
        #: Where alert events go (None: alerts off, as in tests that do not look at them).
        self.alerts_topic = alerts_topic
        self.partitions = partitions
        self.counters = counters
        self._ready = ready
        self.clock = clock
        self._monotonic = monotonic
        #: Keys whose state is due, insertion-ordered (the oldest change goes first), with why
        #: (one of :data:`REASONS`; usage wins over the others).
        self.dirty: dict[str, str] = {}
        #: Key -> its last usage (worker clock); its last publication is latest[key].published_at.
        self.active: dict[str, float] = {}
        # source -> last usage from it (worker clock): the fleet size heartbeats announce
        self._sources: dict[str, float] = {}
        #: The latest state published per key this worker owns (the API and dashboard read it).
        self.latest: dict[str, QuotaState] = {}
        #: Decision latency, for recent states published because of new usage: the newest
        #: record's event time (when its SDK recorded it) to the state's publication (ms).
        #: States published for other reasons are counted in ``published_by_reason`` only.
        self.latencies_ms: deque[float] = deque(maxlen=2000)
        self.published_by_reason: dict[str, int] = dict.fromkeys(REASONS, 0)
        #: Times a key went from open to throttled.
        self.throttle_onsets = 0
        #: Times a key reached a limit of a shadow-mode policy (it would have been throttled).
        self.shadow_onsets = 0
        #: Usage per key-wide policy since this worker started, laid out as an entry's totals
        #: (records, requests, tokens, cost, ...): /metrics exports it per policy, never per
        #: key (cardinality). Counted at publication from each entry's totals.
        self.metered: dict[str, list[int]] = {}
        # partitions assigned here, and whether their keys await a first publication
        self._assigned: set[int] = set()
        self._announce = False
        self._swept_at = 0.0  # when refresh() last dropped old states from `latest`
        # monotonic time before which the next publication tick is skipped (see PUBLISH_SHARE)
        self._publish_after = 0.0
        # the fold's time so far at the last tick: unchanged, nothing waits to be folded
        self._folded = 0.0
        # monotonic time of the last publication, a tick's or publish_if_idle's (a tick that
        # found nothing due leaves it)
        self._published_at = -float("inf")

    def changed(self, keys: Collection[str], sources: Iterable[str], now: float) -> None:
        """Usage of ``keys`` from ``sources`` was folded at ``now``: publish them soon."""
        self.dirty.update(dict.fromkeys(keys, "usage"))
        self.active.update(dict.fromkeys(keys, now))
        seen = self._sources
        for source in sources:
            seen[source] = now

    def due(self, keys: Iterable[str], reason: str) -> None:
        """Publish ``keys`` soon, for ``reason`` (a key already due for usage stays so)."""
        dirty = self.dirty
        for key in keys:
            dirty.setdefault(key, reason)

    def assigned(self, partitions: set[int]) -> None:
        """Partitions were assigned: once recovered, publish all their keys."""
        self._assigned = set(partitions)
        self._announce = True

    def released(self) -> None:
        """Partitions were revoked: keys no longer in the store are not published."""
        entries = self.store.entries
        for key in [k for k in self.dirty if k not in entries]:
            del self.dirty[key]

    def _announce_recovered(self) -> None:
        """Once recovered, publish every key of the assigned partitions: the decisions topic
        and the snapshot may hold an older state of keys taken over from a worker that died
        between saving an entry and publishing it, and no message of theirs may come again."""
        self._announce = False
        keys = self.store.keys_in(self._assigned)
        self.due(keys, "recovery")
        log.info("recovered %d keys; publishing their states", len(keys))

    async def publish_dirty(self) -> None:
        """Publish the state of every key whose usage changed since the last tick, within the
        tick's slice and the publication's share of time (see the module's docstring)."""
        self.output.poll()
        if self._announce and self._ready():
            self._announce_recovered()
        started = self._monotonic()
        folded = self.counters.seconds_folding
        folding, self._folded = folded != self._folded, folded
        if self.dirty and not (folding and started < self._publish_after):
            self._publish_due(started)

    async def publish_if_idle(self) -> None:
        """Publish now if nothing was published for an interval (called after each folded
        message): the tick runs on its own clock, so a change that finds the worker idle would
        otherwise wait for it, half an interval on average. Records were just folded, so
        publication's share of time holds here as in a tick; the tick's own view of whether
        folding goes on is left as it was."""
        if not self.dirty:
            return
        started = self._monotonic()
        if (
            started - self._published_at >= self.settings.publish_interval
            and started >= self._publish_after
        ):
            self._publish_due(started)

    def _publish_due(self, started: float) -> None:
        """Publish the keys due, oldest change first, until the tick's slice is spent."""
        self._published_at = started
        now = self.clock()
        store = self.store
        dirty = self.dirty
        stop_at = started + PUBLISH_SLICE * self.settings.publish_interval
        done: list[str] = []
        by_reason = self.published_by_reason
        for key, reason in dirty.items():  # nothing folds meanwhile: this loop never awaits
            entry = store.get(key)
            if entry is not None:
                state = self._publish(key, entry, now)
                by_reason[reason] += 1
                if reason == "usage":
                    self.latencies_ms.append(max(now - state.watermark, 0.0) * 1000)
            done.append(key)
            if len(done) % 64 == 0 and self._monotonic() >= stop_at:
                break
        if len(done) == len(dirty):
            dirty.clear()
        else:
            for key in done:
                del dirty[key]
        spent = self._monotonic() - started
        self._publish_after = started + spent / PUBLISH_SHARE
        self.counters.seconds_publishing += spent

    def _publish(self, key: str, entry: Entry, now: float) -> QuotaState:
        state = evaluate(key, entry, self.policies, now)
        self._meter(entry, state.scope_policies.get(KEY_SCOPE, NO_POLICY))
        if self.alerts_topic is not None and self.policies.alerting:
            self._alert(key, entry, state, now)
        before = self.latest.get(key)
        if state.throttled and (before is None or not before.throttled):
            self.throttle_onsets += 1
        if state.shadow and (before is None or not before.shadow):
            self.shadow_onsets += 1  # would have been throttled: shadow mode
        self.latest[key] = state
        payload = state.to_json()
        self.output.send(self.decisions_topic, key.encode(), payload)
        self.snapshot.put(key, payload)
        self.counters.states_published += 1
        return state

    def _meter(self, entry: Entry, policy: str) -> None:
        """Add what the entry counted since its last publication to its policy's usage."""
        t, last = entry["t"], entry["mt"]
        if t == last:
            return
        sums = self.metered.get(policy)
        if sums is None:
            sums = self.metered[policy] = [0] * len(t)
        for i, value in enumerate(t):
            sums[i] += value - last[i]
        entry["mt"] = list(t)

    def _alert(self, key: str, entry: Entry, state: QuotaState, now: float) -> None:
        """Send the alerts this state raises; their marks are saved with the entry (see
        :mod:`quotaflow_stream.alerts`: sent first, so a crash repeats one, never loses it)."""
        fired = entry.get("al")
        marks = dict(fired) if fired else {}
        events = list(crossed(state, self.policies, marks, now))
        if not events:
            return
        assert self.alerts_topic is not None
        for event in events:
            self.output.send(self.alerts_topic, key.encode(), json.dumps(event).encode())
            log.info("alert %s: %s at %g of %s", key, event["limit"], event["threshold"],
                     event["limit_value"])  # fmt: skip
        entry["al"] = marks
        self.store.unsaved.add(key)
        self.counters.alerts += len(events)

    def current_state(self, key: str) -> QuotaState | None:
        """The key's state now, if this worker owns it (evaluated afresh: windows slide)."""
        entry = self.store.get(key)
        if entry is None:
            return None
        return evaluate(key, entry, self.policies, self.clock())

    async def refresh(self) -> None:
        """Re-publish active keys now and then (windows roll over without new usage), and send
        a heartbeat so followers can tell a quiet worker from a dead one."""
        now = self.clock()
        w = self.settings
        horizon = now - w.active_horizon
        entries = self.store.entries
        latest, dirty = self.latest, self.dirty
        due = now - w.refresh_interval
        for key, used in list(self.active.items()):
            if used < horizon or key not in entries:
                # quiet (or moved away): the snapshot keeps its last state for the dashboard;
                # dropping it here keeps memory to the keys in use
                del self.active[key]
                latest.pop(key, None)
                continue
            state = latest.get(key)
            if state is None or state.published_at <= due:
                # published by a coming tick, within its time budget
                dirty.setdefault(key, "refresh")
        if now - self._swept_at >= w.active_horizon / 4:
            # states published without later usage (keys recovered, then quiet) go too
            self._swept_at = now
            active = self.active
            for key in [k for k, st in latest.items() if st.published_at < horizon]:
                if key not in active:
                    del latest[key]
        quiet = now - ACTIVE_SOURCE_SECONDS
        for source in [s for s, seen in self._sources.items() if seen < quiet]:
            del self._sources[source]
        beat = heartbeat_json(now, w.app_id, len(self._sources), self.policy_version)
        for partition in range(self.partitions):
            await self.heartbeats.send(key=HEARTBEAT_KEY.encode(), value=beat, partition=partition)
        self.counters.heartbeats += 1
