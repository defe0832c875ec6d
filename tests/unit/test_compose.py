"""The production stack as written: docker-compose.yml and the Dockerfile (parsed, not run:
there is no Docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.settings_names import settings_field

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
LONG_RUNNING = ("kafka", "redis", "worker-1", "worker-2", "gateway")


def env_of(service: str) -> dict[str, Any]:
    env = SERVICES[service].get("environment") or {}
    assert isinstance(env, dict), f"{service}: environment as a mapping"
    return env


def test_the_stack_has_its_services_on_official_images() -> None:
    assert set(SERVICES) == {"kafka", "redis", "topics-init", "worker-1", "worker-2", "gateway"}
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert SERVICES["redis"]["image"].startswith("redis:")
    for name in ("topics-init", "worker-1", "worker-2", "gateway"):
        assert SERVICES[name]["build"] == "." and SERVICES[name]["image"] == "quotaflow:latest"


def test_kafka_runs_in_kraft_mode() -> None:
    env = env_of("kafka")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    assert not any("ZOOKEEPER" in k for k in env) and "zookeeper" not in SERVICES


@pytest.mark.parametrize("service", LONG_RUNNING)
def test_long_running_services_have_healthchecks(service: str) -> None:
    check = SERVICES[service]["healthcheck"]
    assert check["test"] and check["interval"] and check["retries"] >= 3


def test_start_order_waits_for_health_and_for_the_topics() -> None:
    assert SERVICES["topics-init"]["command"] == ["topics", "create"]
    assert SERVICES["topics-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("worker-1", "worker-2", "gateway"):
        deps = SERVICES[name]["depends_on"]
        assert deps["topics-init"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert SERVICES["worker-1"]["command"][0] == "worker"
    assert SERVICES["gateway"]["command"][0] == "gateway"


@pytest.mark.parametrize("service", ["topics-init", "worker-1", "worker-2", "gateway"])
def test_every_quotaflow_variable_is_a_settings_field(service: str) -> None:
    names = [k for k in env_of(service) if k.startswith("QUOTAFLOW_")]
    assert "QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS" in names
    unknown = [n for n in names if not settings_field(n)]
    assert not unknown, f"{service}: not settings fields: {unknown}"


def test_the_field_check_rejects_a_misspelt_name() -> None:
    assert settings_field("QUOTAFLOW_WORKER__API_TOKEN")
    assert not settings_field("QUOTAFLOW_WORKER__API_TOKENS")
    assert not settings_field("QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS__X")


def test_ports_are_published_on_loopback_and_secrets_come_from_the_environment() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port}"
    text = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"QUOTAFLOW_REDIS__PASSWORD: \$\{REDIS_PASSWORD:\?", text)
    assert env_of("worker-1")["QUOTAFLOW_WORKER__API_TOKEN"].startswith("${QUOTAFLOW_API_TOKEN")


def test_the_gateway_listens_beyond_loopback_with_a_salt_of_its_own() -> None:
    """The compose gateway listens on 0.0.0.0 (inside its container), where the shipped salt is
    refused: its salt must come from the environment, required."""
    from quotaflow.settings import GatewaySettings

    command = SERVICES["gateway"]["command"]
    host = command[command.index("--listen") + 1].rpartition(":")[0]
    assert GatewaySettings(listen_host=host).salt_problem() is not None
    assert env_of("gateway")["QUOTAFLOW_GATEWAY__KEY_SALT"].startswith("${QUOTAFLOW_KEY_SALT:?")


def test_the_dockerfile_builds_the_cli_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert 'ENTRYPOINT ["quotaflow"]' in text
    assert re.search(r"^USER (?!root)", text, re.M), "runs as a non-root user"
    # the roles the image runs, and OpenTelemetry export for operators who turn it on
    assert ".[stream,openai,otel,parquet]" in text
