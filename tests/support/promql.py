"""The metric names a PromQL expression reads, as Prometheus parses it (promql-parser, the
Rust parser's Python binding: no promtool here), and the rules and dashboard that use them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "config" / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "quotaflow-dashboard.json"
#: Grafana's range variables, as Prometheus would see them once Grafana substitutes them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}
#: Series Prometheus makes itself for every target; no exporter serves them.
SYNTHETIC = {"up"}


def parse(expr: str) -> Any:
    """The expression's syntax tree; ValueError naming the problem if Prometheus would refuse it."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return promql_parser.parse(expr)


def metric_names(expr: str) -> set[str]:
    return set(_names(parse(expr)))


def _names(node: Any) -> Iterator[str]:
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            yield node.name
    elif isinstance(node, promql_parser.MatrixSelector):
        yield from _names(node.vector_selector)
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from _names(node.lhs)
        yield from _names(node.rhs)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from _names(arg)
    elif isinstance(node, promql_parser.AggregateExpr):
        yield from _names(node.expr)
        if node.param is not None:
            yield from _names(node.param)
    elif isinstance(
        node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)
    ):
        yield from _names(node.expr)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in doc["panels"] for target in panel["targets"]]


def used_metrics() -> set[str]:
    """Every metric the dashboard and the alert rules read, but Prometheus' own."""
    exprs = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    return {name for expr in exprs for name in metric_names(expr)} - SYNTHETIC
