"""``quotaflow simulate`` end to end on the test stack: separate SDK processes, a real worker,
both arms measured in one run."""

from __future__ import annotations

from pathlib import Path

import pytest

from quotaflow.settings import QuotaflowSettings
from quotaflow_producers.simulate import SimulationPlan, policies_yaml, run_simulation
from quotaflow_stream.harness import DevStack, WorkerProcess
from tests.support import pipeline_settings

pytestmark = pytest.mark.e2e

RPM, TPM = 600, 400_000
BUDGET = 0.05  # dollars a minute: ~380 gpt-4o-mini calls of the simulated sizes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("simulate")


@pytest.fixture(scope="module")
def settings(stack: DevStack, workdir: Path) -> QuotaflowSettings:
    policies = workdir / "policies.yaml"
    policies.write_text(policies_yaml(RPM, TPM, BUDGET))
    return pipeline_settings(stack, workdir, policies_file=policies)


def test_fleet_of_processes_reports_both_arms(
    settings: QuotaflowSettings, worker: WorkerProcess, workdir: Path
) -> None:
    run_dir = workdir / "run"
    run_dir.mkdir()
    # 20x offered load: the limits are reached within the first few seconds
    plan = SimulationPlan(
        instances=3, keys_per_arm=2, load=20, duration=12, rpm=RPM, tpm=TPM, budget=BUDGET
    )
    result = run_simulation(settings, run_dir, plan, progress=False)
    run = result["run"]
    assert run["fleet_seen_by_instances_at_start"] == 3 and run["undelivered"] == 0
    for arm in ("with_shares", "baseline_without_shares"):
        keys = result[arm]["keys"]
        assert len(keys) == 3, "a request-, a token- and a money-bound key"
        for key in keys.values():
            assert key["admitted"] > 0 and key["denied"] > 0, key
        propagation = result[arm]["propagation_ms"]
        # the README: p50 140 / p99 311 ms with 20 instances at 5x load; 3 instances here
        assert propagation["count"] > 0
        assert propagation["p50"] < 500 and propagation["p99"] < 2000, propagation
    # budget shares acted, and held the fleet to its limits
    assert result["decisions_by_reason"].get("share", 0) > 0
    for bound in ("requests", "tokens", "cost"):
        assert result["with_shares"][bound]["overshoot_pct_max"] <= 1.0, bound
    assert result["check_us"]["count"] > 100
