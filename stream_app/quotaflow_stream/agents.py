"""The worker's parts on one Faust app: built here, then registered as an explicit step.

:class:`StreamWorker` builds the topics, the bulk producer, the store over its table, the state
publisher, the dead letters and the usage pipeline, handing each what it needs;
:meth:`StreamWorker.register` then puts the usage agent, the save, publication, refresh and
snapshot timers and the rebalance hooks on the app. The parts themselves know nothing of Faust
(see :mod:`quotaflow_stream.pipeline`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import faust

from quotaflow.policies import KEY_SCOPE, Limits, Policy, PolicySet
from quotaflow.policy_log import PolicyVersion
from quotaflow.policy_topic import PolicyFollower, signing_key
from quotaflow.prices import load_price_table
from quotaflow.settings import QuotaflowSettings
from quotaflow.state import QuotaState
from quotaflow_stream.counters import Counters
from quotaflow_stream.deadletters import DeadLetters
from quotaflow_stream.evaluate import scopes_for
from quotaflow_stream.output import BulkProducer
from quotaflow_stream.pipeline import SAVE_TICK, UsagePipeline
from quotaflow_stream.publisher import StatePublisher
from quotaflow_stream.snapshot import SnapshotWriter
from quotaflow_stream.store import AggregateStore, aggregate_table

log = logging.getLogger(__name__)


def raw_topic(app: faust.App, name: str, partitions: int | None) -> Any:
    """A topic of bytes in, bytes out: parsing is ours, so a bad message reaches the DLQ
    instead of failing inside Faust's deserializer."""
    return app.topic(
        name,
        partitions=partitions,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )


class StreamWorker:
    """One worker's pipeline, publisher and dead letters on ``app``."""

    def __init__(
        self,
        app: faust.App,
        settings: QuotaflowSettings,
        policies: PolicySet,
        snapshot: SnapshotWriter,
        *,
        usage_partitions: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.settings = settings
        self.policies = policies
        self.snapshot = snapshot
        self.partitions = usage_partitions
        w, t = settings.worker, settings.topics
        self.counters = Counters()
        self.usage_topic = raw_topic(app, t.usage, usage_partitions)
        self.decisions_topic = raw_topic(app, t.decisions, usage_partitions)
        self.dlq_topic = raw_topic(app, t.dlq, None)
        self.output = BulkProducer(settings)
        self.store = AggregateStore(
            aggregate_table(app, usage_partitions),
            usage_partitions,
            self.output,
            scopes_for=scopes_for(policies),
            price=load_price_table(settings.prices_file).record_cost,
            grace=w.grace_seconds,
            horizon=w.dedup_horizon,
            month_zones=policies.month_zones,
        )
        self.publisher = StatePublisher(
            w,
            policies,
            self.store,
            self.output,
            snapshot,
            self.decisions_topic,
            decisions_topic=t.decisions,
            alerts_topic=t.alerts,
            partitions=usage_partitions,
            counters=self.counters,
            ready=lambda: self.ready,
            clock=clock,
        )
        self.dead_letters = DeadLetters(self.dlq_topic, self.counters)
        #: The live policy version in force (None: the policy file).
        self.policy_version: int | None = None
        # the newest version the follower thread handed over, adopted on the event loop
        self._incoming: tuple[PolicyVersion | None, dict[Any, Limits]] | None = None
        self._file_policies = policies
        self.policy_follower = (
            PolicyFollower(settings, self._hand_over) if settings.policies.follow else None
        )
        self.pipeline = UsagePipeline(
            w,
            self.store,
            self.publisher,
            self.dead_letters,
            self.usage_topic,
            partitions=usage_partitions,
            counters=self.counters,
            rebalancing=lambda: bool(app.rebalancing),
            clock=clock,
        )

    def register(self) -> StreamWorker:
        """Put the agent, the timers and the rebalance hooks on the app."""
        app, w, pipeline = self.app, self.settings.worker, self.pipeline

        async def aggregate_usage(stream: Any) -> None:
            # acks are the pipeline's: a message is acked once the entries it changed are saved
            await pipeline.consume(stream.noack())

        async def flush_snapshot() -> None:
            await self.snapshot.flush()

        app.agent(self.usage_topic, name="aggregate-usage")(aggregate_usage)
        app.timer(w.heartbeat_interval)(self.publisher.refresh)
        app.timer(w.publish_interval)(self.publisher.publish_dirty)
        app.timer(min(SAVE_TICK, w.save_interval))(pipeline.save_tick)
        app.timer(w.snapshot_interval)(flush_snapshot)
        app.timer(POLICY_TICK)(self._adopt_incoming)
        if self.policy_follower is not None:
            self.policy_follower.start()
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]
        return self

    def _hand_over(
        self, version: PolicyVersion | None, overrides: dict[tuple[str, str | None], Limits]
    ) -> None:
        self._incoming = (version, overrides)  # one assignment: the loop picks the newest up

    async def _adopt_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            self.adopt_policies(*incoming)

    def adopt_policies(
        self,
        version: PolicyVersion | None,
        overrides: dict[tuple[str, str | None], Limits] | None = None,
    ) -> int:
        """Count and publish by the live policies from now on (a version, else the file, with
        the overrides in force); republish at once the keys whose policies changed. Returns
        how many. Counts stay: no window resets (a scope a new model policy names starts
        counting now)."""
        base = version.policies if version is not None else self._file_policies
        old = self.policies
        new = PolicySet(base.policies, base.source, overrides) if overrides else base
        self.policies = new
        self.store.adopt(scopes_for(new), new.month_zones)
        self.publisher.policies = new
        changed = [
            key for key, entry in self.store.entries.items()
            if any(_bound(old, key, scope) != _bound(new, key, scope) for scope in entry["s"])
        ]  # fmt: skip
        self.publisher.due(changed, "policy")
        number = version.version if version is not None else None
        if version is not None and number != self.policy_version:
            self.snapshot.put_policies(version.to_json(signing_key(self.settings)))
        self.policy_version = self.publisher.policy_version = number
        log.info("policies: version %s in force with %d overrides; %d keys to republish",
                 number, len(overrides or {}), len(changed))  # fmt: skip
        return len(changed)

    def _usage_partitions(self, tps: Any) -> set[int]:
        name = self.usage_topic.get_topic_name()
        return {tp.partition for tp in tps if tp.topic == name}

    async def _on_revoked(self, sender: Any, revoked: Any, **_: Any) -> None:
        await self.pipeline.revoked(self._usage_partitions(revoked))

    async def _on_assigned(self, sender: Any, assigned: Any, **_: Any) -> None:
        self.pipeline.assigned(self._usage_partitions(assigned))

    @property
    def ready(self) -> bool:
        """Partitions assigned and tables recovered: usage sent now is processed promptly."""
        try:
            assigned = bool(self.app.consumer.assignment())
        except Exception:  # not started yet
            return False
        return assigned and self.serving

    @property
    def serving(self) -> bool:
        """Started, tables recovered and no rebalance under way: what a readiness probe asks.
        Unlike :attr:`ready` it holds for a worker with no partitions (a standby, or a new
        replica during a rolling update), which is healthy, only idle."""
        app = self.app
        try:
            recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        except Exception:  # not started yet
            return False
        return recovered and not app.rebalancing

    def current_state(self, key: str) -> QuotaState | None:
        return self.publisher.current_state(key)

    def stats(self) -> dict[str, Any]:
        stats = self.counters.as_dict()
        stats.update(
            ready=self.ready,
            snapshot_written=self.snapshot.written,
            snapshot_pending=self.snapshot.pending,
            snapshot_healthy=self.snapshot.healthy,
            active_keys=len(self.publisher.active),
            published_keys=len(self.publisher.latest),
            unacked_messages=self.pipeline.unacked_messages,
            output_failed=self.output.failed,
            policy_version=self.policy_version,
            state_publications=dict(self.publisher.published_by_reason),
            **self.store.stats(),
        )
        return stats


#: Seconds between looks for a policy version the follower thread handed over.
POLICY_TICK = 0.05


def _bound(policies: PolicySet, key: str, scope: str) -> tuple[Policy, ...]:
    """The policies binding ``key`` in ``scope`` (``""``: key-wide, else a model)."""
    return tuple(b.policy for b in policies.resolve(key, None if scope == KEY_SCOPE else scope))
