"""The bench commands run on the embedded default and print their figures as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_bench_gateway_prints_latencies_against_direct_calls(tmp_path: Path) -> None:
    env = {**os.environ, "QUOTAFLOW_DEV_STATE": str(tmp_path / "none.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "quotaflow", "bench", "gateway", "--requests", "30", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["requests_per_path"] == 30
    for path in ("direct", "gateway"):
        assert 0 < result[path]["p50_ms"] <= result[path]["p99_ms"]
    assert result["added_p50_ms"] == pytest.approx(
        result["gateway"]["p50_ms"] - result["direct"]["p50_ms"], abs=0.01
    )
    assert result["records_emitted"] == 50, "every gateway call (warm-up included) recorded"
