"""Shared fixtures. The embedded broker (Tansu) and Redis (Valkey) start once per session on free
loopback ports; every test module that needs a pipeline gets topics, an app id and a Redis
prefix of its own, so tests never see each other's data. A backend that cannot start fails the
tests that need it: nothing here skips.

``settings`` and ``worker`` are the module's own pipeline and its running worker. A module runs
under the policies in its ``PIPELINE_POLICIES`` (YAML text) if it has them, else under
``config/policies.yaml``; one that needs more overrides ``settings`` by asking for it."""

from __future__ import annotations

import os
from collections.abc import Iterator

# LiteLLM fetches its price map from the network when imported unless told not to: tests are
# offline (and quotaflow prices from its own table)
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest

from quotaflow.settings import QuotaflowSettings
from quotaflow_producers.testing import OpenAIStub
from quotaflow_stream.harness import DevStack, WorkerProcess, start_stack, stop_stack
from tests.support import pipeline_settings, running_worker


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def settings(
    stack: DevStack, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> QuotaflowSettings:
    workdir = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    policies = getattr(request.module, "PIPELINE_POLICIES", None)
    policies_file = None
    if policies is not None:
        policies_file = workdir / "policies.yaml"
        policies_file.write_text(policies)
    return pipeline_settings(stack, workdir, policies_file=policies_file)


@pytest.fixture(scope="module")
def worker(settings: QuotaflowSettings) -> Iterator[WorkerProcess]:
    yield from running_worker(settings)


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    """A local provider-like upstream of the module's own (OpenAI's and Anthropic's APIs)."""
    s = OpenAIStub().start()
    yield s
    s.stop()
