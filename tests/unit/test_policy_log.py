"""The policy version message contract: what a reader believes, what it refuses and why, and
the diff people review before applying."""

from __future__ import annotations

import json

import pytest

from quotaflow.policies import parse_policies
from quotaflow.policy_log import PolicyLog, RefusedMessage, diff, new_version, read_version

DOC = {"policies": [{"name": "a", "keys": ["k*"], "limits": {"requests_per_minute": 10}}]}


def test_a_version_round_trips_and_its_hash_ignores_key_order() -> None:
    v = new_version(DOC, 3, "ann@host", "why", 1_700_000_000.0)
    back = read_version(v.to_json())
    assert (back.version, back.author, back.message, back.document) == (3, "ann@host", "why", DOC)
    reordered = json.loads(json.dumps(DOC))
    reordered["policies"][0] = dict(reversed(list(reordered["policies"][0].items())))
    assert new_version(reordered, 3, "x", "", 0).hash == v.hash


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty message"),
        (b"{", "not JSON"),
        (b'{"v": 2}', "not a policy version"),
        (b"x" * (1024 * 1024 + 1), "exceeds"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(RefusedMessage, match=reason):
        read_version(raw)


def test_a_document_is_checked_like_the_policy_file_and_its_hash_must_match() -> None:
    body = json.loads(new_version(DOC, 1, "a", "", 0).to_json())
    bad = {**body, "document": {"policies": [{"name": "a", "keys": ["k"], "limits": {}}]}}
    bad["hash"] = new_version(DOC, 1, "a", "", 0).hash
    with pytest.raises(RefusedMessage, match="hash: does not match"):
        read_version(json.dumps(bad).encode())
    from quotaflow.policy_log import content_hash

    invalid = {"policies": [{"name": "a", "keys": ["k"],
                             "limits": {"requests_per_minute": -1}}]}  # fmt: skip
    forged = {**body, "document": invalid, "hash": content_hash(invalid)}
    with pytest.raises(RefusedMessage, match="requests_per_minute"):
        read_version(json.dumps(forged).encode())
    for field, value in (("version", 0), ("version", True), ("author", 5), ("time", "now")):
        with pytest.raises(RefusedMessage, match=field):
            read_version(json.dumps({**body, field: value}).encode())


def test_with_a_signing_key_only_signed_versions_are_believed() -> None:
    v = new_version(DOC, 1, "a", "", 0)
    assert read_version(v.to_json("s3cret"), "s3cret").version == 1
    with pytest.raises(RefusedMessage, match="signature"):
        read_version(v.to_json(), "s3cret")  # unsigned
    with pytest.raises(RefusedMessage, match="signature"):
        read_version(v.to_json("other"), "s3cret")
    tampered = json.loads(v.to_json("s3cret"))
    tampered["message"] = "changed after signing"
    with pytest.raises(RefusedMessage, match="signature"):
        read_version(json.dumps(tampered).encode(), "s3cret")


def test_the_first_message_of_a_version_wins_and_the_highest_version_is_current() -> None:
    log = PolicyLog()
    first = new_version(DOC, 1, "ann", "", 10.0)
    other = new_version({"policies": [{**DOC["policies"][0], "name": "b"}]}, 1, "bob", "", 11.0)
    assert log.add(first.to_json(), "@0")
    assert not log.add(other.to_json(), "@1")
    assert log.current is not None and log.current.author == "ann"
    assert "version 1 was already written by ann" in log.refused[-1]
    assert not log.add(first.to_json(), "@2"), "the same message again (both keys) is no news"
    assert log.refused[-1].startswith("@1"), "and no refusal either"
    assert log.add(new_version(DOC, 2, "cy", "", 12.0).to_json(), "@3")
    assert not log.add(b"garbage", "@4") and log.current.version == 2


def test_the_diff_names_policies_added_removed_and_each_setting_changed() -> None:
    old = parse_policies({"policies": [
        {"name": "a", "keys": ["k*"], "limits": {"requests_per_minute": 10, "cost_per_day": 5}},
        {"name": "gone", "default": True, "limits": {"requests_per_minute": 1}},
    ]})  # fmt: skip
    new = parse_policies({"policies": [
        {"name": "a", "keys": ["k*"], "limits": {"requests_per_minute": 20,
                                                "tokens_per_minute": 100},
         "fail_mode": "closed"},
        {"name": "new", "keys": ["n"], "limits": {"images_per_minute": 2}},
    ]})  # fmt: skip
    assert diff(old, new) == [
        "+ policy new: keys=n [images_per_minute=2]",
        "- policy gone",
        "~ a: cost_per_day removed (was $5.000000)",
        "~ a: requests_per_minute 10 -> 20",
        "~ a: tokens_per_minute added = 100",
        "~ a: fail_mode 'open' -> 'closed'",
    ]
    assert diff(new, new) == []


def test_an_override_boosts_or_clamps_one_key_and_model_and_leaves_the_rest() -> None:
    from quotaflow.policies import PolicySet, parse_limits

    base = parse_policies({"policies": [
        {"name": "a", "keys": ["k*"], "limits": {"requests_per_minute": 10,
                                                "tokens_per_minute": 100}},
        {"name": "m", "keys": ["k*"], "models": ["big"], "limits": {"tokens_per_minute": 50}},
    ]})  # fmt: skip
    ps = PolicySet(base.policies, overrides={
        ("k1", None): parse_limits({"tokens_per_minute": 1000, "cost_per_day": 2.5}),
        ("k2", "big"): parse_limits({"tokens_per_minute": 5}),
        ("other", None): parse_limits({"requests_per_minute": 1}),
    })  # fmt: skip
    (k1,) = ps.resolve("k1")
    assert {s.name: s.limit for s in k1.policy.specs} == {
        "requests_per_minute": 10, "tokens_per_minute": 1000, "cost_per_day": 2_500_000,
    }  # fmt: skip
    assert k1.money and k1.policy.name == "a"
    assert {s.name: s.limit for s in ps.resolve("k3")[0].policy.specs}["tokens_per_minute"] == 100
    _, big = ps.resolve("k2", "big")
    assert [(s.name, s.limit) for s in big.policy.specs] == [("tokens_per_minute", 5)]
    assert [(s.name, s.limit) for s in ps.resolve("k3", "big")[1].policy.specs] == [
        ("tokens_per_minute", 50)
    ]
    (alone,) = ps.resolve("other")
    assert alone.policy.name == "override:other" and alone.rows[0][3] == 1
    assert base.resolve("k1")[0].policy.specs[1].limit == 100, "the base set is unchanged"


def test_override_messages_take_effect_expire_and_clear_in_topic_order() -> None:
    from quotaflow.policy_log import Override

    log = PolicyLog()
    set_ = Override("k1", None, {"requests_per_minute": 5}, 100.0, "launch", "ann", 10.0)
    assert log.add(set_.to_json(), "@0")
    assert set(log.active_overrides(50.0)) == {("k1", None)}
    assert log.active_overrides(100.0) == {}, "expired at expires_at"
    cleared = Override("k1", None, None, None, "done", "ann", 20.0)
    assert log.add(cleared.to_json(), "@1") and log.active_overrides(50.0) == {}
    assert [o.reason for o in log.override_history] == ["launch", "done"]
    bad = json.loads(set_.to_json())
    hostile = [
        ("limits", {"requests_per_minute": -1}, "requests_per_minute"),
        ("limits", {"nonsense_per_minute": 1}, "nonsense"),
        ("key", "", "key"),
        ("expires_at", "soon", "expires_at"),
    ]
    for field, value, reason in hostile:
        assert not log.add(json.dumps({**bad, field: value}).encode(), "@x")
        assert reason in log.refused[-1], (field, log.refused[-1])
    assert log.active_overrides(50.0) == {}, "refused overrides change nothing"


def test_ttls_and_limit_assignments_are_parsed_strictly() -> None:
    from quotaflow._exceptions import QuotaflowError
    from quotaflow.policies_cli import parse_assignments, parse_ttl

    assert parse_ttl("90s") == 90 and parse_ttl("1h30m") == 5400 and parse_ttl("2d") == 172800
    for bad in ("", "2", "2x", "h", "1h 30m", "0s", "-5m"):
        with pytest.raises(QuotaflowError):
            parse_ttl(bad)
    assert parse_assignments(["tokens_per_minute=2000", "cost_per_day=2.50"]) == {
        "tokens_per_minute": 2000, "cost_per_day": 2.5,
    }  # fmt: skip
    with pytest.raises(QuotaflowError, match="tokens_per_minute"):
        parse_assignments(["tokens_per_minute=-3"])
    with pytest.raises(QuotaflowError, match="LIMIT=VALUE"):
        parse_assignments(["tokens_per_minute"])


def test_a_version_with_no_policies_is_refused_everywhere() -> None:
    """Never run with empty policies: neither apply nor a reader takes such a document."""
    from quotaflow._exceptions import ConfigError
    from quotaflow.policy_log import content_hash

    with pytest.raises(ConfigError, match="no policies"):
        new_version({"policies": []}, 1, "a", "", 0)
    body = json.loads(new_version(DOC, 1, "a", "", 0).to_json())
    empty = {**body, "document": {"policies": []}, "hash": content_hash({"policies": []})}
    with pytest.raises(RefusedMessage, match="no policies"):
        read_version(json.dumps(empty).encode())
