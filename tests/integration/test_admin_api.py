"""The worker's admin API over real HTTP: tokens (none 401, the read token 403 on writes),
validation (422 naming the field), optimistic concurrency (409), overrides, OpenAPI; and an
SDK following what the API wrote."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from quotaflow import QuotaClient
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import DevStack, WorkerProcess
from tests.support import pipeline_settings, wait_for

pytestmark = pytest.mark.integration

READ, ADMIN = "read-token-1", "admin-token-2"


@pytest.fixture(scope="module")
def settings(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> QuotaflowSettings:
    s = pipeline_settings(stack, tmp_path_factory.mktemp("admin"))
    s.worker.api_token = SecretStr(READ)
    s.worker.admin_token = SecretStr(ADMIN)
    return s


def call(worker: WorkerProcess, method: str, path: str, token: str | None = None,
         body: Any = None) -> tuple[int, Any]:  # fmt: skip
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{worker.base_url}{path}", data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


DOC = {"policies": [{"name": "api", "keys": ["api-*"], "limits": {"requests_per_minute": 2}}]}


def test_tokens_validation_concurrency_and_an_sdk_following_what_the_api_wrote(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    # reads: the read token or the admin token; none is 401
    assert call(worker, "GET", "/api/policies")[0] == 401
    assert call(worker, "GET", "/api/policies", READ) == (
        200,
        {"version": None, "source": str(settings.policies_file), "document": None},
    )
    # writes: none 401, the read token 403, and nothing was written
    put = {"document": DOC, "message": "from the API"}
    assert call(worker, "PUT", "/api/policies", None, put)[0] == 401
    status, body = call(worker, "PUT", "/api/policies", READ, put)
    assert status == 403 and "admin token" in body["error"]
    # a bad document: 422 naming the field
    bad = {"document": {"policies": [{"name": "api", "keys": ["api-*"],
                                      "limits": {"requests_per_minute": -1}}]}}  # fmt: skip
    status, body = call(worker, "PUT", "/api/policies", ADMIN, bad)
    assert status == 422 and "policies[0].limits.requests_per_minute" in body["error"]
    assert call(worker, "PUT", "/api/policies", ADMIN, {"document": "x"})[0] == 422
    # a dry run: the diff, nothing published
    status, body = call(worker, "PUT", "/api/policies", ADMIN, {**put, "dry_run": True})
    assert status == 200 and body["live_version"] is None and body["changes"]
    with QuotaClient(settings) as client:
        assert client.wait_ready(30) and client.policy_version is None
        status, body = call(worker, "PUT", "/api/policies", ADMIN, {**put, "expect_version": 0})
        assert status == 200 and body["version"] == 1, body
        wait_for(lambda: client.policy_version == 1, 5, what="the SDK on the API's version")
        assert [client.check("api-k").allowed for _ in range(1)] == [True]
        # the change was made against version 0: refused now
        again = {"document": DOC, "expect_version": 0}
        assert call(worker, "PUT", "/api/policies", ADMIN, again)[0] == 409
        wait_for(lambda: (call(worker, "GET", "/api/policies", READ)[1]).get("version") == 1, 5)
        # an override through the API, in force in the SDK, then cleared
        status, body = call(worker, "PUT", "/api/overrides/api-k", ADMIN,
                            {"limits": {"requests_per_minute": 50}, "ttl_seconds": 60,
                             "reason": "api boost"})  # fmt: skip
        assert status == 200 and body["expires_at"] > time.time()
        wait_for(lambda: client.overrides_in_force == 1, 5, what="the override in force")
        assert call(worker, "PUT", "/api/overrides/api-k", READ, {"limits": {}})[0] == 403
        status, body = call(worker, "PUT", "/api/overrides/api-k", ADMIN,
                            {"limits": {"requests_per_minute": "lots"}})  # fmt: skip
        assert status == 422 and "requests_per_minute" in body["error"]
        listed = wait_for(lambda: call(worker, "GET", "/api/overrides", READ)[1]["overrides"], 5)
        assert [(o["key"], o["reason"]) for o in listed] == [("api-k", "api boost")]
        assert call(worker, "DELETE", "/api/overrides/api-k", ADMIN)[0] == 200
        wait_for(lambda: client.overrides_in_force == 0, 5, what="the override cleared")
        # rollback, history
        status, body = call(worker, "POST", "/api/policies/rollback", ADMIN, {"version": 9})
        assert status == 404 and "no version 9" in body["error"]
    history = call(worker, "GET", "/api/policies/history", ADMIN)[1]
    assert [v["message"] for v in history["versions"]] == ["from the API"]
    assert [o["reason"] for o in history["overrides"]][:1] == ["api boost"]
    spec = call(worker, "GET", "/api/openapi.json")[1]
    assert spec["openapi"].startswith("3.") and "/api/overrides/{key}" in spec["paths"]
    assert set(spec["paths"]["/api/policies"]) == {"get", "put"}


def test_without_an_admin_token_the_api_only_reads(stack: DevStack, tmp_path: Path) -> None:
    from tests.support import running_worker

    s = pipeline_settings(stack, tmp_path)
    for w in running_worker(s):
        status, body = call(w, "PUT", "/api/policies", "anything", {"document": DOC})
        assert status == 403 and "QUOTAFLOW_WORKER__ADMIN_TOKEN" in body["error"]
        assert call(w, "GET", "/api/policies")[0] == 200
