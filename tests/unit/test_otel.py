"""OpenTelemetry export turned on by settings alone (QUOTAFLOW_OTEL__ENABLED), in a process of
its own: the global providers a service configures receive quotaflow's usage metrics. (With
explicit providers, against a running pipeline: tests/integration/test_telemetry.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SERVICE = """
import json
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from quotaflow import QuotaClient, load_settings
from quotaflow.policies import parse_policies
from quotaflow.transports import MemoryTransport

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))  # the service's own setup
policies = parse_policies({"policies": [{"name": "p", "keys": ["*"],
                                         "limits": {"requests_per_minute": 100}}]})
quota = QuotaClient(load_settings(), policies=policies, transport=MemoryTransport(),
                    follow=False)
quota.record("team-a", "gpt-4o", prompt_tokens=120, completion_tokens=30, provider="openai")
quota.record("team-a", "gpt-4o", prompt_tokens=80, completion_tokens=10, provider="openai")
quota.close()
points = {}
data = reader.get_metrics_data()  # None when nothing was ever recorded
for rm in (data.resource_metrics if data else []):
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            for p in m.data.data_points:
                key = m.name + "|" + ",".join(f"{k}={v}" for k, v in sorted(p.attributes.items()))
                points[key] = getattr(p, "sum", getattr(p, "value", None))
print(json.dumps(points))
"""


def run(enabled: str) -> dict[str, float]:
    env = {**os.environ, "QUOTAFLOW_OTEL__ENABLED": enabled, "QUOTAFLOW_CLIENT__JOURNAL": "false"}
    out = subprocess.run([sys.executable, "-c", SERVICE], env=env, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_enabled_by_settings_the_services_providers_get_genai_usage_metrics() -> None:
    points = run("true")
    attrs = "gen_ai.operation.name=chat,gen_ai.provider.name=openai,gen_ai.request.model=gpt-4o"
    assert points[f"gen_ai.client.token.usage|{attrs},gen_ai.token.type=input"] == 200
    assert points[f"gen_ai.client.token.usage|{attrs},gen_ai.token.type=output"] == 40
    assert points[f"quotaflow.client.requests|{attrs},quotaflow.status=ok"] == 2
    assert points[f"quotaflow.client.cost|{attrs}"] > 0


def test_off_by_default_nothing_is_exported() -> None:
    assert run("false") == {}
