"""Two LiteLLM processes, each a Router with quotaflow's callback, calling a local provider-like
upstream through the real pipeline (broker, worker, Redis): together they admit no more than the
key's limit, where each alone would admit it all (LiteLLM's own per-replica limits drift,
#27736, #40291)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from quotaflow.settings import QuotaflowSettings
from quotaflow_producers.testing import OpenAIStub
from quotaflow_stream.harness import WorkerProcess

pytestmark = pytest.mark.e2e

LIMIT = 30
PIPELINE_POLICIES = f"""
version: 1
policies:
  - {{name: litellm-fleet, keys: ["ll-*"], fail_mode: closed, max_staleness: 30,
     limits: {{requests_per_minute: {LIMIT}}}}}
"""
# One LiteLLM process: a Router whose callback is quotaflow's, offering calls at a steady pace.
INSTANCE = """
import asyncio, json, sys, time
import litellm
from quotaflow import QuotaClient
from quotaflow.integrations.litellm import QuotaflowCallback

base, calls = sys.argv[1], int(sys.argv[2])
quota = QuotaClient().open()
quota.wait_ready(30)
callback = QuotaflowCallback(quota, key="ll-fleet")
litellm.callbacks = [callback]
router = litellm.Router(model_list=[{"model_name": "gpt-4o", "litellm_params": {
    "model": "openai/gpt-4o", "api_base": base, "api_key": "sk-test"}}], num_retries=0)
print("ready", flush=True)
sys.stdin.readline()  # start together

async def main():
    admitted = denied = 0
    for _ in range(calls):
        try:
            await router.acompletion(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            admitted += 1
        except litellm.RateLimitError:
            denied += 1
        await asyncio.sleep(0.1)
    while quota.open_reservations:  # LiteLLM settles on this loop: let it finish
        await asyncio.sleep(0.05)
    return admitted, denied

admitted, denied = asyncio.run(main())
quota.close()
print(json.dumps({"admitted": admitted, "denied": denied}), flush=True)
"""


def test_two_litellm_processes_share_one_limit(
    settings: QuotaflowSettings, worker: WorkerProcess, stub: OpenAIStub
) -> None:
    env = {**os.environ, **settings.to_env(), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("QUOTAFLOW_CLIENT__SOURCE", None)
    calls = 40  # each offers more than the whole limit, over ~5 s
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", INSTANCE, stub.base_url, str(calls)],
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        for p in processes:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        served_before = len(stub.reported)
        for p in processes:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        started = time.time()
        results = [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    elapsed = time.time() - started
    admitted = sum(r["admitted"] for r in results)
    served = len(stub.reported) - served_before
    print(f"\nLiteLLM fleet: {[r['admitted'] for r in results]} admitted of {2 * calls} offered "
          f"in {elapsed:.1f}s, limit {LIMIT} a minute")  # fmt: skip
    assert elapsed < 60, "all within one minute window"
    assert served == admitted, "every admitted call reached the upstream, no denied one did"
    # the fleet-wide bound (budget shares): at most the limit, where each alone would take it
    assert admitted <= LIMIT
    assert admitted >= LIMIT * 0.8, "and the budget is used, not starved"
    assert all(r["admitted"] > 0 for r in results), "both replicas got a share"
