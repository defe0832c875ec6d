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


def run_bench(tmp_path: Path, *args: str) -> dict[str, object]:
    env = {**os.environ, "QUOTAFLOW_DEV_STATE": str(tmp_path / "none.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "quotaflow", "bench", *args, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_bench_check_reports_sdk_and_baseline_latencies(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "check", "--keys", "2000", "--samples", "5000", "--rounds", "2")
    assert result["keys_cached"] == 2000
    check = result["check"]
    base = result["baseline_limits_moving_window_redis"]
    assert isinstance(check, dict) and isinstance(base, dict)
    assert 0 < check["p50_us"] <= check["p99_us"]
    assert base["p50_us"] > check["p50_us"], "a Redis round trip per call is slower"
    memory = result["memory"]
    assert isinstance(memory, dict)
    assert memory["sdk"]["keys"] == 100_000 and memory["sdk"]["bytes_per_key"] > 0
    assert memory["worker"]["key_windows"] >= 999_999


def test_bench_stream_verifies_counts_for_both_layouts(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path, "stream", "--records", "3000", "--keys", "200", "--baseline-records", "600"
    )
    packed, naive = result["packed"], result["naive_baseline"]
    assert isinstance(packed, dict) and isinstance(naive, dict)
    assert packed["counts_exact"] is True and naive["counts_exact"] is True
    assert packed["messages"] < packed["records"] and naive["messages"] == naive["records"]
    assert packed["records_per_s"] > 0 and naive["records_per_s"] > 0
    # the worker reports where its time went while it aggregated
    shares = packed["time_shares"]
    assert set(shares) == {"folding", "publishing", "saving", "collecting"}
    assert shares["folding"] > 0 and 0 <= shares["collecting"] < 1
    assert packed["changelog_writes"] > 0, "the bench waits for the worker to save"
