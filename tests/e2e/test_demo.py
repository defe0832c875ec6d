"""`quotaflow demo` as a user runs it: a private embedded stack, a worker, simulated traffic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_demo_json_totals_equal_what_the_clients_sent(tmp_path: Path) -> None:
    env = {**os.environ, "QUOTAFLOW_DEV_STATE": str(tmp_path / "no-dev-stack.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "quotaflow", "demo", "--duration", "8", "--instances", "3",
         "--json", "--seed", "7"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["totals_match"] is True
    assert summary["records_sent"] > 50
    assert summary["records_aggregated"] == summary["records_sent"]
    assert summary["states_published"] >= 1 and summary["dlq"] == 0
    assert summary["denials"] > 0, "the example policies throttle the demo traffic"
    for key, k in summary["keys"].items():
        assert k["sent"]["records"] == k["aggregated"]["records"], key
        assert k["sent"]["prompt_tokens"] == k["aggregated"]["prompt_tokens"], key
