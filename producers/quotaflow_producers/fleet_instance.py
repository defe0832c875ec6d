"""One instance of the simulated fleet: a separate process with its own QuotaClient.

It offers Poisson-distributed calls on every key of the run, checks each with the SDK, records
the admitted ones, and logs what it did for the coordinator (:mod:`quotaflow_producers.simulate`)
to merge: each admission and denial with its wall-clock time and size, each ``check()``
latency, and when it applied each quota state that brought a key near a limit.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quotaflow.client import QuotaClient
from quotaflow.settings import load_settings
from quotaflow.state import QuotaState
from quotaflow_producers.traffic import sample_tokens

#: A state is logged when some limit has less than this fraction left: those are the states
#: whose arrival turns calls into denials.
NEAR_LIMIT = 0.05

#: Times a call denied by its budget share is asked again (after the decision's retry_after)
#: before it counts as denied: a share denial means "wait for the next state", not "over".
SHARE_RETRIES = 5

#: Seconds to wait for the workers' heartbeats to count the whole fleet before starting.
FLEET_WAIT = 20.0


@dataclass(frozen=True)
class SimKey:
    """A key of the run and what its calls cost: ``rate`` calls/s offered by this instance."""

    key: str
    rate: float
    model: str = "gpt-4o-mini"


@dataclass
class InstancePlan:
    """What the coordinator asks of one instance (passed to the child process)."""

    index: int
    source: str
    env: dict[str, str]
    keys: list[SimKey]
    out: Path
    ready_file: Path
    start_file: Path
    duration: float
    seed: int
    instances: int


@dataclass
class InstanceLog:
    #: key -> (time, requests, tokens, cost in micro-dollars) of each admitted call
    admitted: dict[str, list[tuple[float, int, int, int]]] = field(default_factory=dict)
    #: key -> (time, requests, tokens, cost, reason) of each denied call
    denied: dict[str, list[tuple[float, int, int, int, str]]] = field(default_factory=dict)
    check_ns: list[int] = field(default_factory=list)
    #: (key, published_at) -> (watermark, applied at)
    applied: dict[str, list[float]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "admitted": self.admitted,
            "denied": self.denied,
            "check_ns": self.check_ns,
            "applied": self.applied,
            "reasons": self.reasons,
        }


def run_instance(plan: InstancePlan) -> None:
    """The child process's main: set up, wait for the start signal, offer load, write the log."""
    os.environ.update(plan.env)
    settings = load_settings()
    settings.client.source = plan.source
    client = QuotaClient(settings)
    log = InstanceLog()
    _log_near_limit_states(client, log)
    client.open()
    client.wait_ready(60)
    # Announce this instance to the workers (they count the fleet from usage sources) and wait
    # until their heartbeats do, as a fleet already running would be before keys appear.
    client.record("sim-warmup", "none", prompt_tokens=1)
    deadline = time.monotonic() + FLEET_WAIT
    while client.cache.fleet_instances < plan.instances and time.monotonic() < deadline:
        time.sleep(0.05)
    plan.ready_file.write_text(str(client.cache.fleet_instances))
    while not plan.start_file.exists():
        time.sleep(0.01)
    started = float(plan.start_file.read_text())
    while time.time() < started:
        time.sleep(0.001)
    _offer_load(client, plan, log, started + plan.duration)
    undelivered = client.close()
    doc = log.to_json()
    doc["undelivered"] = undelivered
    doc["fleet_seen"] = client.cache.fleet_instances
    plan.out.write_text(json.dumps(doc))


def _log_near_limit_states(client: QuotaClient, log: InstanceLog) -> None:
    cache = client.cache
    apply = cache.apply_state
    newest: dict[str, float] = {}

    def logged_apply(state: QuotaState, *, live: bool = True) -> bool:
        applied = apply(state, live=live)
        # only states that carry new usage: a periodic re-publication's watermark is old
        if applied and live and state.watermark > newest.get(state.key, 0.0):
            newest[state.key] = state.watermark
            if _near_limit(state):
                log.applied[f"{state.key}|{state.published_at!r}"] = [state.watermark, time.time()]
        return applied

    cache.apply_state = logged_apply  # type: ignore[method-assign]


def _near_limit(state: QuotaState) -> bool:
    return any(lim.remaining < NEAR_LIMIT * lim.limit for lim in state.limits)


def _offer_load(client: QuotaClient, plan: InstancePlan, log: InstanceLog, until: float) -> None:
    """Offer Poisson calls until ``until``, as callers that honour the SDK's answers: a call
    denied by its budget share (``share``: wait ``retry_after``, ~50 ms, and ask again) is
    asked again that much later, up to :data:`SHARE_RETRIES` times; a call denied by a limit
    is dropped. Each call is logged once, when admitted or finally denied."""
    rng = random.Random(plan.seed)
    keys = plan.keys
    weights = [k.rate for k in keys]
    total_rate = sum(weights)
    for k in keys:
        log.admitted[k.key] = []
        log.denied[k.key] = []
    retries: list[tuple[float, int, SimKey, int, int, int]] = []  # (due, seq, key, p, c, tries)
    seq = 0
    next_at = time.time() + rng.expovariate(total_rate)
    perf = time.perf_counter_ns
    while True:
        if retries and retries[0][0] <= next_at:
            due, _, sim, prompt, completion, tries = heapq.heappop(retries)
        elif next_at < until:
            due, sim, tries = next_at, rng.choices(keys, weights)[0], 0
            prompt, completion = sample_tokens(rng)
            next_at += rng.expovariate(total_rate)
        else:
            break
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        t0 = perf()
        decision = client.check(
            sim.key, sim.model, prompt_tokens=prompt, completion_tokens=completion
        )
        log.check_ns.append(perf() - t0)
        now = time.time()
        log.reasons[decision.reason] = log.reasons.get(decision.reason, 0) + 1
        if decision.allowed:
            r = client.record(
                sim.key, sim.model, prompt_tokens=prompt, completion_tokens=completion
            )
            log.admitted[sim.key].append((now, 1, prompt + completion, r.cost_micros or 0))
        elif decision.reason == "share" and tries < SHARE_RETRIES and now < until:
            seq += 1
            retry = (now + decision.retry_after, seq, sim, prompt, completion, tries + 1)
            heapq.heappush(retries, retry)
        else:
            cost = client.pricer.cost(sim.key, sim.model, now, prompt, completion)
            log.denied[sim.key].append((now, 1, prompt + completion, cost, decision.reason))
