"""Live policies on the real broker: apply (diff, optimistic concurrency), history, rollback,
an SDK and a worker following the topic, and what a hostile writer of the topic can do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Producer

from quotaflow import QuotaClient
from quotaflow.policy_log import DOCUMENT_KEY, content_hash, version_key
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import WorkerProcess
from tests.support import wait_for

pytestmark = pytest.mark.integration

PIPELINE_POLICIES = """
policies:
  - name: live
    keys: ["live-*"]
    limits: {requests_per_minute: 1000}
    fail_mode: open
    budget_shares: false
"""


def cli(settings: QuotaflowSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run(
        [sys.executable, "-m", "quotaflow", "policies", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def write(tmp_path: Path, name: str, rpm: int, extra: str = "") -> Path:
    path = tmp_path / name
    path.write_text(
        "policies:\n  - name: live\n    keys: ['live-*']\n"
        f"    limits: {{requests_per_minute: {rpm}}}\n    budget_shares: false\n{extra}"
    )
    return path


def admitted(client: QuotaClient, key: str, calls: int) -> int:
    n = 0
    for _ in range(calls):
        if client.check(key).allowed:
            client.record(key, "m", prompt_tokens=1)
            n += 1
    return n


def test_apply_is_followed_by_the_sdk_and_the_worker_with_history_and_rollback(
    settings: QuotaflowSettings, worker: WorkerProcess, tmp_path: Path
) -> None:
    with QuotaClient(settings) as client:
        assert client.wait_ready(30)
        assert client.policy_version is None, "no version published: the file rules"
        assert admitted(client, "live-a", 5) == 5

        tight = write(tmp_path, "tight.yaml", 3)
        dry = cli(settings, "apply", str(tight), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "~ live: requests_per_minute 1000 -> 3" in dry.stdout
        assert cli(settings, "history").stdout.strip() == "", "a dry run publishes nothing"

        applied_at = time.monotonic()
        done = cli(settings, "apply", str(tight), "-m", "tighten for the test")
        assert done.returncode == 0, done.stderr
        assert "published version 1" in done.stdout
        wait_for(lambda: client.policy_version == 1, 5, what="the SDK adopts version 1")
        took = time.monotonic() - applied_at
        lag = client.policy_lag
        print(f"\npublished to enforced: {lag * 1000:.0f} ms; apply command to enforced: "
              f"{took * 1000:.0f} ms (its Python start-up included)")  # fmt: skip
        assert lag is not None and lag < 1.0, "in force within 1 s of its publication"
        # five already counted against a limit now 3: denied until usage slides under
        wait_for(lambda: not client.check("live-a").allowed, 5, what="a lowered limit denies")
        assert admitted(client, "live-b", 5) == 3, "a fresh key gets the new limit"
        wait_for(lambda: (worker.stats() or {}).get("policy_version") == 1, 5,
                 what="the worker adopts version 1")  # fmt: skip

        # optimistic concurrency: a change made against version 0 is refused now
        loose = write(tmp_path, "loose.yaml", 50)
        stale = cli(settings, "apply", str(loose), "--expect-version", "0")
        assert stale.returncode != 0 and "live policy version is 1" in stale.stderr
        raised = cli(settings, "apply", str(loose), "-m", "raise", "--expect-version", "1")
        assert raised.returncode == 0, raised.stderr
        wait_for(lambda: client.policy_version == 2, 5, what="version 2")
        wait_for(lambda: client.check("live-a").allowed, 5, what="a raised limit admits at once")

        history = cli(settings, "history", "--json")
        rows = [json.loads(line) for line in history.stdout.splitlines()]
        assert [(r["version"], r["message"]) for r in rows] == [
            (1, "tighten for the test"),
            (2, "raise"),
        ]
        assert rows[1]["changes"] == ["~ live: requests_per_minute 3 -> 50"]

        back = cli(settings, "rollback", "1")
        assert back.returncode == 0, back.stderr
        wait_for(lambda: client.policy_version == 3, 5, what="the rollback as version 3")
        got = json.loads(cli(settings, "get", "--format", "json").stdout)
        assert got["policies"][0]["limits"] == {"requests_per_minute": 3}
        assert json.loads(cli(settings, "get", "--version", "2", "--format", "json").stdout)[
            "policies"][0]["limits"] == {"requests_per_minute": 50}  # fmt: skip
        assert client.stats()["policy_version"] == 3
        assert client.check("live-c").policy_version == 3, "each decision names its version"


def test_a_hostile_writer_of_the_topic_changes_nothing(
    settings: QuotaflowSettings, worker: WorkerProcess, tmp_path: Path
) -> None:
    """Garbage, a document that fails validation, a forged hash, a version number replayed
    with other content: each is refused with a reason, the version in force stays, and
    neither the SDK nor the worker stops following."""
    with QuotaClient(settings) as client:
        assert client.wait_ready(30)
        live = wait_for(lambda: client.policy_version, 10, what="a version in force")
        raw = Producer({**settings.kafka.confluent_config()})
        good_doc = {"policies": [{"name": "live", "keys": ["live-*"],
                                  "limits": {"requests_per_minute": 1}}]}  # fmt: skip
        bad_doc = {"policies": [{"name": "live", "keys": ["live-*"],
                                 "limits": {"requests_per_minute": -5}}]}  # fmt: skip

        def message(version: int, doc: dict, digest: str | None = None) -> bytes:
            return json.dumps({
                "v": 1, "version": version, "author": "mallory", "time": time.time(),
                "message": "", "document": doc, "hash": digest or content_hash(doc),
            }).encode()  # fmt: skip

        for value in (
            b"\xff not json",
            b"[]",
            message(live + 1, bad_doc),
            message(live + 1, good_doc, digest="sha256:0000"),
            message(live, good_doc),  # replays the version in force with other content
            message(10**6, "not a document"),  # type: ignore[arg-type]
        ):
            raw.produce(settings.topics.policies, key=DOCUMENT_KEY, value=value, partition=0)
        raw.flush(10)
        time.sleep(1.0)
        assert client.policy_version == live
        refused = client.policy_follower.log.refused  # type: ignore[union-attr]
        reasons = "\n".join(refused[-6:])
        for expected in ("not JSON", "not a policy version", "requests_per_minute",
                         "hash: does not match", f"version {live} was already written",
                         "document: expected an object"):  # fmt: skip
            assert expected in reasons, (expected, reasons)
        assert (worker.stats() or {}).get("policy_version") == live, "the worker kept it too"

        # and a valid version after all that is still followed
        next_file = write(tmp_path, "next.yaml", 7)
        done = cli(settings, "apply", str(next_file), "-m", "after the noise")
        assert done.returncode == 0, done.stderr
        wait_for(lambda: client.policy_version == live + 1, 5, what="the next version")
        assert version_key(live + 1) == f"version:{live + 1}".encode()


def limits(settings: QuotaflowSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run(
        [sys.executable, "-m", "quotaflow", "limits", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def test_an_override_clamps_one_key_expires_on_its_own_and_clears(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    with QuotaClient(settings) as client:
        assert client.wait_ready(30)
        in_force = client.policies.resolve("live-ov")[0].policy.specs[0].limit
        assert in_force >= 3, "the version in force allows a few calls a minute"
        done = limits(settings, "set", "live-ov", "requests_per_minute=1", "--ttl", "4s",
                      "--reason", "clamp for the test")  # fmt: skip
        assert done.returncode == 0, done.stderr
        wait_for(lambda: client.overrides_in_force == 1, 5, what="the SDK takes the override")
        assert admitted(client, "live-ov", 3) == 1, "clamped to 1 a minute"
        assert admitted(client, "live-other", 3) == 3, "other keys keep their policy"
        listed = [json.loads(x) for x in limits(settings, "list", "--json").stdout.splitlines()]
        assert [(r["key"], r["limits"], r["reason"]) for r in listed] == [
            ("live-ov", {"requests_per_minute": 1}, "clamp for the test")
        ]
        # expires on its own: the policy's limit again, the call counted before still counted
        wait_for(lambda: client.overrides_in_force == 0, 8, what="the override expires")
        assert admitted(client, "live-ov", in_force) == in_force - 1
        assert limits(settings, "list").stdout.strip() == ""

        boost = limits(settings, "set", "live-ov", "requests_per_minute=100")
        assert boost.returncode == 0, boost.stderr
        wait_for(lambda: client.overrides_in_force == 1, 5, what="a boost")
        assert client.check("live-ov").allowed
        assert limits(settings, "clear", "live-ov").returncode == 0
        wait_for(lambda: client.overrides_in_force == 0, 5, what="cleared")
        assert not client.check("live-ov").allowed, "back to the policy, already spent"
        wait_for(lambda: not (worker.stats() or {}).get("unacked_messages"), 10)

        bad = limits(settings, "set", "live-ov", "requests_per_minute=-2")
        assert bad.returncode != 0 and "requests_per_minute" in bad.stderr
        audit = cli(settings, "history").stdout
        assert "live-ov: set {'requests_per_minute': 1}  clamp for the test" in audit
        assert "live-ov: cleared" in audit


def test_without_the_broker_an_sdk_starts_on_the_workers_redis_copy(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    """At start-up: the topic, else the Redis copy, else the file. The worker copies each
    version it adopts to Redis; an SDK that cannot reach the broker enforces that copy (after
    checking it like a topic message), not its file."""
    import redis

    from quotaflow.policy_log import read_version
    from quotaflow.policy_topic import publish
    from quotaflow_stream.harness import free_port

    doc = {"policies": [{"name": "live", "keys": ["live-*"], "limits": {"requests_per_minute": 9}}]}
    live = publish(settings, doc, author="t", message="for the copy", expect_version=None).version
    stored = redis.Redis.from_url(settings.redis.url)

    def copied() -> int | None:
        raw = stored.get(settings.redis.policies_key)
        return read_version(raw).version if raw else None

    wait_for(lambda: copied() == live, 10, what="the worker's Redis copy of the new version")
    cut_off = settings.model_copy(deep=True)
    cut_off.kafka.bootstrap_servers = f"127.0.0.1:{free_port()}"  # nothing listens there
    client = QuotaClient(cut_off).open()
    try:
        wait_for(lambda: client.policy_version == live, 10, what="the Redis copy in force")
        assert client.policies.resolve("live-z")[0].policy.specs[0].limit == 9
    finally:
        client.close(timeout=1)
    # a copy that fails the checks is refused: the file rules
    stored.set(settings.redis.policies_key, b'{"v": 1, "version": 99, "document": {}}')
    client = QuotaClient(cut_off).open()
    try:
        time.sleep(1.0)
        assert client.policy_version is None
        refused = client.policy_follower.log.refused  # type: ignore[union-attr]
        assert refused and refused[-1].startswith(f"redis {settings.redis.policies_key}")
    finally:
        client.close(timeout=1)
        stored.close()


def test_shadow_mode_through_the_topic_admits_and_reports(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    """A version whose policy does not enforce: every SDK admits past the limit and says
    which limit would have denied; the worker's state names it without throttling the key."""
    from quotaflow.policy_topic import publish

    doc = {"policies": [{"name": "live", "keys": ["live-*"], "enforce": False,
                         "limits": {"requests_per_minute": 2}}]}  # fmt: skip
    version = publish(settings, doc, author="t", message="shadow", expect_version=None).version
    with QuotaClient(settings) as client:
        assert client.wait_ready(30)
        wait_for(lambda: client.policy_version == version, 5)
        decisions = []
        for _ in range(4):
            decisions.append(client.check("live-shadow"))
            client.record("live-shadow", "m", prompt_tokens=1)
        assert all(d.allowed for d in decisions)
        assert [d.shadow for d in decisions] == [None, None, "requests_per_minute",
                                                 "requests_per_minute"]  # fmt: skip
        assert client.stats()["shadow_denials"] == {"requests_per_minute": 2}

    def state() -> object:
        url = f"{worker.base_url}/api/keys/live-shadow"
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.loads(resp.read())
        return doc if doc["totals"]["records"] == 4 else None

    got = wait_for(state, 20, what="the worker's state of the shadowed key")
    assert got["shadow"] == ["requests_per_minute"] and not got["throttled"]  # type: ignore[index]
