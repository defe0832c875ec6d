"""A simulated instance offers calls as a caller honouring the SDK's answers would (no broker:
a scripted client stands in for the SDK's decisions)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from quotaflow_producers.fleet_instance import (
    SHARE_RETRIES,
    InstanceLog,
    InstancePlan,
    SimKey,
    _offer_load,
)


class ScriptedClient:
    """Answers each check from a script of reasons (then admits), per key."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.checks: list[tuple[str, int, float]] = []  # (key, prompt tokens, time)
        self.pricer = SimpleNamespace(cost=lambda *a: 7)

    def check(self, key: str, model: str, **call: int) -> Any:
        self.checks.append((key, call["prompt_tokens"], time.time()))
        reasons = self.script.get(key) or []
        reason = reasons.pop(0) if reasons else "ok"
        return SimpleNamespace(allowed=reason == "ok", reason=reason, retry_after=0.002)

    def record(self, key: str, model: str, **call: int) -> Any:
        return SimpleNamespace(cost_micros=5)


def plan(key: str, rate: float) -> InstancePlan:
    return InstancePlan(
        index=0, source="s", env={}, keys=[SimKey(key, rate)], out=Path("unused"),
        ready_file=Path("unused"), start_file=Path("unused"), duration=0.0, seed=3, instances=1,
    )  # fmt: skip


def test_a_share_denial_is_asked_again_after_its_retry_after_and_logged_once() -> None:
    client = ScriptedClient({"k": ["share", "share"]})
    log = InstanceLog()
    _offer_load(client, plan("k", 2.0), log, until=time.time() + 0.5)  # type: ignore[arg-type]
    first, second, third = client.checks[:3]
    # the first call, asked three times (share, share, admitted), with the same size
    assert first[1] == second[1] == third[1]
    assert second[2] - first[2] >= 0.002 and third[2] - second[2] >= 0.002
    assert log.reasons["share"] == 2 and log.admitted["k"] and not log.denied["k"]
    assert len(log.admitted["k"]) == len(client.checks) - 2, "one entry per call"


def test_a_limit_denial_is_dropped_and_share_retries_run_out() -> None:
    client = ScriptedClient({"k": ["limit"] + ["share"] * (SHARE_RETRIES + 1)})
    log = InstanceLog()
    _offer_load(client, plan("k", 1.0), log, until=time.time() + 3.0)  # type: ignore[arg-type]
    reasons = [d[4] for d in log.denied["k"]]
    assert reasons == ["limit", "share"], "the second call denied once retries ran out"
    sizes = [c[1] for c in client.checks[1 : SHARE_RETRIES + 2]]
    assert len(set(sizes)) == 1, "the same call asked again"
    assert log.denied["k"][0][3] == 7, "a denied call's cost, as priced"
