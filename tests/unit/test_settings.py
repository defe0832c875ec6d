import json
from pathlib import Path

import pytest

from quotaflow import ConfigError, load_settings
from quotaflow.settings import DEV_STATE_ENV


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DEV_STATE_ENV, str(tmp_path / "dev.json"))


def test_nested_env_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("QUOTAFLOW_TOPICS__PARTITIONS", "12")
    monkeypatch.setenv("QUOTAFLOW_WORKER__WEB_PORT", "7000")
    s = load_settings()
    assert s.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert s.topics.partitions == 12 and s.worker.web_port == 7000


def test_sasl_ssl_options_reach_the_confluent_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTAFLOW_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("QUOTAFLOW_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("QUOTAFLOW_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("QUOTAFLOW_KAFKA__SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("QUOTAFLOW_KAFKA__SSL_CAFILE", "/etc/ca.pem")
    monkeypatch.setenv("QUOTAFLOW_KAFKA__CLIENT_OPTIONS", '{"socket.timeout.ms": "5000"}')
    s = load_settings()
    conf = s.kafka.confluent_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "svc" and conf["sasl.password"] == "hunter2"
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert conf["socket.timeout.ms"] == "5000"
    assert "hunter2" not in repr(s), "secrets must not show in reprs or logs"


def test_redis_password_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTAFLOW_REDIS__URL", "rediss://cache:6380/1")
    monkeypatch.setenv("QUOTAFLOW_REDIS__PASSWORD", "s3cret")
    s = load_settings()
    assert s.redis.client_kwargs()["password"] == "s3cret"
    assert "s3cret" not in repr(s)


def test_invalid_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTAFLOW_TOPICS__PARTITIONS", "0")
    with pytest.raises(ConfigError, match=r"topics\.partitions"):
        load_settings()


def test_dev_stack_endpoints_sit_below_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "dev.json").write_text(
        json.dumps({"kafka_bootstrap": "127.0.0.1:1111", "redis_url": "redis://127.0.0.1:2222/0"})
    )
    s = load_settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:1111"
    assert s.redis.url == "redis://127.0.0.1:2222/0"
    monkeypatch.setenv("QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS", "prod:9092")
    assert load_settings().kafka.bootstrap_servers == "prod:9092"


def test_unparseable_env_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTAFLOW_GATEWAY__KEY_SOURCES", "[header")
    with pytest.raises(ConfigError, match="gateway"):
        load_settings()


def test_to_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(
        topics={"usage": "u.x", "partitions": 3}, gateway={"key_sources": ["organization", "ip"]}
    )
    for name, value in s.to_env().items():
        monkeypatch.setenv(name, value)
    again = load_settings()
    assert again.topics.usage == "u.x" and again.topics.partitions == 3
    assert again.gateway.key_sources == ["organization", "ip"]
    assert again.client.source != "" and "QUOTAFLOW_CLIENT__SOURCE" not in s.to_env()


def test_example_env_file_is_valid() -> None:
    from quotaflow.settings import QuotaflowSettings

    example = Path(__file__).resolve().parents[2] / "config" / "quotaflow.env.example"
    s = QuotaflowSettings(_env_file=str(example))  # type: ignore[call-arg]
    assert s.topics.partitions == 8 and s.kafka.security_protocol == "PLAINTEXT"
    assert s.worker.fetch_max_wait_ms == 20


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # a blank entry of a Secret's env file must not become an empty salt or token
    monkeypatch.setenv("QUOTAFLOW_GATEWAY__KEY_SALT", "")
    monkeypatch.setenv("QUOTAFLOW_WORKER__API_TOKEN", "")
    monkeypatch.setenv("QUOTAFLOW_GATEWAY__METRICS_TOKEN", "")
    settings = load_settings()
    assert settings.gateway.default_salt and settings.worker.api_token is None
    assert settings.gateway.metrics_token is None
    settings.gateway.listen_host = "0.0.0.0"
    assert settings.gateway.salt_problem() is not None
