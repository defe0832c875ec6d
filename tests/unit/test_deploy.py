"""The production manifests beyond compose (config/deploy): every Kubernetes overlay rendered by
``kubectl kustomize`` and validated offline against the Kubernetes API schemas; the Prometheus
rules and the Grafana dashboard parsed as Prometheus parses PromQL. (That every metric they use
is really exported is tested against a running worker and gateway: tests/integration/
test_telemetry.py.)"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from quotaflow.policies import parse_policies
from quotaflow.settings import load_settings
from quotaflow_stream.topics import topic_specs
from tests.support.promql import (
    DASHBOARD,
    DEPLOY,
    alert_rules,
    dashboard_exprs,
    metric_names,
    parse,
)
from tests.support.settings_names import settings_field

KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUSTOMIZE / "overlays").iterdir() if p.is_dir())
#: The Kubernetes version the objects are validated against (kubectl's here: v1.32).
KUBERNETES = "1.32.0"
#: Custom resources: no upstream schema ships with kubernetes-validate; checked field by field.
CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"), ("kafka.strimzi.io/v1beta2", "KafkaTopic")}
DOCKERFILE_UID = int(
    re.search(r"--uid (\d+)", (DEPLOY.parents[1] / "Dockerfile").read_text()).group(1)  # type: ignore[union-attr]
)


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl is not installed: CI renders every overlay with it")
        pytest.skip("kubectl is not installed here (CI renders every overlay with it)")
    return found


@functools.cache
def _render(path: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {path}: {out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def render(overlay: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(KUSTOMIZE / "overlays" / overlay)))


def of_kind(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[Any]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def settings_of(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The QUOTAFLOW_* settings every pod gets from the rendered quotaflow-config ConfigMap."""
    (config,) = [
        o
        for o in of_kind(objects, "ConfigMap")
        if o["metadata"]["name"].startswith("quotaflow-config")
    ]
    data: dict[str, str] = config["data"]
    return data


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (o["metadata"]["name"], o["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    ]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_the_base_and_every_overlay_render() -> None:
    assert {"production", "keda", "strimzi"} <= set(OVERLAYS)
    _render(KUSTOMIZE / "base")
    for overlay in OVERLAYS:
        kinds = {o["kind"] for o in render(overlay)}
        assert {"Deployment", "Service", "PodDisruptionBudget", "Job", "ConfigMap"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_schemas(overlay: str) -> None:
    for obj in render(overlay):
        if (obj["apiVersion"], obj["kind"]) in CUSTOM:
            continue
        # strict: a field the schema does not know (a typo) is an error too
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_the_validation_catches_a_misspelled_field() -> None:
    (worker,) = of_kind(render("production"), "Deployment", "quotaflow-worker")
    worker["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = worker["spec"][
        "template"
    ]["spec"]["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_quotaflow_variable_is_a_settings_field(overlay: str) -> None:
    objects = render(overlay)
    names = set(settings_of(objects))
    for _, spec in pod_specs(objects):
        for container in containers(spec):
            names |= {e["name"] for e in container.get("env", [])}
    example = (KUSTOMIZE / "base" / "secrets.env.example").read_text()
    names |= set(re.findall(r"^#? ?(QUOTAFLOW_[A-Z_]+)=", example, re.M))
    unknown = sorted(n for n in names if n.startswith("QUOTAFLOW_") and not settings_field(n))
    assert not unknown, f"not settings fields: {unknown}"
    assert {"QUOTAFLOW_REDIS__PASSWORD", "QUOTAFLOW_GATEWAY__KEY_SALT"} <= names
    # and they load as pydantic-settings reads them from a pod's environment
    env = settings_of(objects)
    assert _load_from_env(env).topics.partitions == int(env["QUOTAFLOW_TOPICS__PARTITIONS"])


def _load_from_env(env: dict[str, str]) -> Any:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return load_settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_every_pod_reads_the_config_map_and_the_secret() -> None:
    for name, spec in pod_specs(render("production")):
        for container in containers(spec):
            refs = {
                (kind, ref["name"])
                for r in container["envFrom"]
                for kind, ref in r.items()
            }  # fmt: skip
            config = {n for kind, n in refs if kind == "configMapRef"}
            assert any(n.startswith("quotaflow-config") for n in config), (name, refs)
            assert ("secretRef", "quotaflow-secrets") in refs, (name, refs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_read_only_and_never_escalate(overlay: str) -> None:
    for name, spec in pod_specs(render(overlay)):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == DOCKERFILE_UID, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in containers(spec):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            requests = container["resources"]["requests"]
            assert requests["cpu"] and requests["memory"], (name, container["name"])
            assert container["resources"]["limits"]["memory"], (name, container["name"])
        if name != "quotaflow-setup":
            # what the process writes (tables, journal, tokenizer data) is on volumes
            mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
            assert {"/data", "/tmp"} <= mounts, name


def test_workers_stop_within_their_grace_and_scale_within_the_partitions() -> None:
    objects = render("production")
    env = settings_of(objects)
    partitions = int(env["QUOTAFLOW_TOPICS__PARTITIONS"])
    (worker,) = of_kind(objects, "Deployment", "quotaflow-worker")
    assert 1 <= worker["spec"]["replicas"] <= partitions
    spec = worker["spec"]["template"]["spec"]
    # the final save on SIGTERM gets stop_timeout, Faust's own stop as long again
    stop = float(env["QUOTAFLOW_WORKER__STOP_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] >= 2 * stop + 5
    (container,) = spec["containers"]
    assert container["args"][0] == "worker"
    assert env["QUOTAFLOW_WORKER__WEB_HOST"] == "0.0.0.0", "probes reach the pod's address"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == int(env.get("QUOTAFLOW_WORKER__WEB_PORT", 6066))
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_the_gateway_has_a_service_a_disruption_budget_and_probes() -> None:
    objects = render("production")
    env = settings_of(objects)
    (gateway,) = of_kind(objects, "Deployment", "quotaflow-gateway")
    (service,) = of_kind(objects, "Service", "quotaflow-gateway")
    (pdb,) = of_kind(objects, "PodDisruptionBudget", "quotaflow-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < gateway["spec"]["replicas"]
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "gateway"
    port = container["ports"][0]["containerPort"]
    assert port == int(env["QUOTAFLOW_GATEWAY__LISTEN_PORT"])
    assert env["QUOTAFLOW_GATEWAY__LISTEN_HOST"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_the_setup_job_creates_topics_then_applies_the_policy_config_map() -> None:
    objects = render("production")
    env = settings_of(objects)
    (job,) = of_kind(objects, "Job", "quotaflow-setup")
    spec = job["spec"]["template"]["spec"]
    assert [c["args"][:2] for c in spec["initContainers"]] == [["topics", "create"]]
    (apply,) = spec["containers"]
    assert apply["args"][:2] == ["policies", "apply"]
    mount = apply["volumeMounts"][0]["mountPath"]
    assert apply["args"][2] == env["QUOTAFLOW_POLICIES_FILE"] == f"{mount}/policies.yaml"
    (volume,) = spec["volumes"]
    (config,) = [
        o
        for o in of_kind(objects, "ConfigMap")
        if o["metadata"]["name"] == volume["configMap"]["name"]
    ]
    policies = parse_policies(yaml.safe_load(config["data"]["policies.yaml"]), "ConfigMap")
    assert policies.policies, "a document with policies"


def test_keda_scales_workers_on_the_usage_topics_lag_up_to_the_partitions() -> None:
    objects = render("keda")
    env = settings_of(objects)
    (scaled,) = of_kind(objects, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "quotaflow-worker"
    assert of_kind(objects, "Deployment", spec["scaleTargetRef"]["name"])
    assert spec["maxReplicaCount"] == int(env["QUOTAFLOW_TOPICS__PARTITIONS"])
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    settings = _load_from_env(env)
    assert trigger["metadata"]["consumerGroup"] == settings.worker.app_id
    assert trigger["metadata"]["topic"] == settings.topics.usage
    assert trigger["metadata"]["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert int(trigger["metadata"]["lagThreshold"]) > 0


def test_strimzi_topics_match_what_topics_create_makes() -> None:
    objects = render("strimzi")
    settings = _load_from_env(settings_of(objects))
    topics = {o["spec"]["topicName"]: o["spec"] for o in of_kind(objects, "KafkaTopic")}
    expected = {spec.name: spec for spec in topic_specs(settings)}
    assert set(topics) == set(expected)
    for name, spec in expected.items():
        assert topics[name]["partitions"] == spec.partitions, name
        assert topics[name]["replicas"] == settings.topics.replication_factor, name
        assert topics[name]["config"] == spec.config, name
    for topic in of_kind(objects, "KafkaTopic"):
        assert topic["metadata"]["labels"]["strimzi.io/cluster"]
    (job,) = of_kind(objects, "Job", "quotaflow-setup")
    assert "initContainers" not in job["spec"]["template"]["spec"], "Strimzi makes the topics"


# -- Prometheus rules and the Grafana dashboard ---------------------------------------------


def test_every_alert_rule_parses_and_says_what_to_do() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        parse(rule["expr"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # the ones the issue asks for, by what they read
    reads = {name for rule in rules for name in metric_names(rule["expr"])}
    assert {
        "up",
        "quotaflow_heartbeats_total",
        "quotaflow_consumer_lag",
        "quotaflow_sdk_stale",
        "quotaflow_dlq_records_total",
        "quotaflow_limit_utilization",
        "quotaflow_gateway_upstream_errors_total",
    } <= reads


def test_a_broken_expression_is_refused() -> None:
    with pytest.raises(ValueError):
        parse("sum(rate(quotaflow_records_total[5m])")


def test_the_dashboard_parses_and_covers_what_operators_watch() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids))
    reads = set()
    for expr in dashboard_exprs():
        reads |= metric_names(expr)
    assert {
        "quotaflow_records_total",  # fleet throughput
        "quotaflow_consumer_lag",  # lag per partition
        "quotaflow_decision_latency_ms",
        "quotaflow_states_published_total",
        "quotaflow_throttled_keys",
        "quotaflow_dlq_records_total",
        "quotaflow_duplicate_records_total",
        "quotaflow_usage_total",  # usage and spend against limits per policy
        "quotaflow_cost_usd_total",
        "quotaflow_limit_utilization",
        "quotaflow_gateway_request_duration_seconds_bucket",  # gateway latency
        "quotaflow_gateway_upstream_errors_total",
    } <= reads
    variables = {v["name"] for v in doc["templating"]["list"]}
    for panel in doc["panels"]:
        uid = panel["datasource"]["uid"]
        assert uid.startswith("${") and uid[2:-1] in variables, panel["title"]
