from pathlib import Path

import pytest

from quotaflow import ConfigError, load_policies
from quotaflow.policies import KEY_SCOPE, parse_policies

ROOT = Path(__file__).resolve().parents[2]


def doc(*policies: dict[str, object]) -> dict[str, object]:
    return {"version": 1, "policies": list(policies)}


def test_example_file_loads() -> None:
    policies = load_policies(ROOT / "config/policies.yaml")
    assert len(policies) >= 4
    assert policies.get("default") is not None


def test_precedence_exact_then_glob_in_file_order_then_default() -> None:
    ps = parse_policies(
        doc(
            {"name": "glob-a", "keys": ["team-*"], "limits": {"requests_per_minute": 1}},
            {"name": "glob-b", "keys": ["team-a*"], "limits": {"requests_per_minute": 2}},
            {"name": "exact", "keys": ["team-alpha"], "limits": {"requests_per_minute": 3}},
            {"name": "fallback", "default": True, "limits": {"requests_per_minute": 4}},
        )
    )
    assert [b.policy.name for b in ps.resolve("team-alpha")] == ["exact"]
    assert [b.policy.name for b in ps.resolve("team-anna")] == ["glob-a"]
    assert [b.policy.name for b in ps.resolve("someone")] == ["fallback"]


def test_precedence_edges_character_classes_repeated_keys_and_shared_bindings() -> None:
    ps = parse_policies(
        doc(
            {"name": "first", "keys": ["k1", "team-[xy]*"], "limits": {"requests_per_minute": 1}},
            {"name": "second", "keys": ["k1", "k2"], "limits": {"requests_per_minute": 2}},
            {"name": "m", "keys": ["k*"], "models": ["gpt-*"], "limits": {"images_per_minute": 3}},
        )
    )
    # an exact id named by two policies: the first in file order
    assert [b.policy.name for b in ps.resolve("k1")] == ["first"]
    assert [b.policy.name for b in ps.resolve("k2")] == ["second"]
    # a character class is a glob, not an exact id
    assert [b.policy.name for b in ps.resolve("team-x1")] == ["first"]
    assert ps.resolve("team-[xy]*") == () and ps.resolve("team-z") == ()
    # keys bound by the same policy share one binding (memory and resolve time per key)
    (_, model1), (_, model2) = ps.resolve("k1", "gpt-a"), ps.resolve("k2", "gpt-a")
    assert model1 is model2 and model1.scope == "gpt-a"
    assert ps.resolve("k9", "gpt-a")[0].policy.name == "m"


def test_model_policy_binds_alongside_the_key_policy() -> None:
    ps = parse_policies(
        doc(
            {"name": "key", "keys": ["k*"], "limits": {"tokens_per_minute": 100}},
            {
                "name": "gpt4o",
                "keys": ["k*"],
                "models": ["gpt-4o*"],
                "limits": {"tokens_per_minute": 10},
            },
        )
    )
    bindings = ps.resolve("k1", "gpt-4o-2024-08-06")
    assert [(b.scope, b.policy.name) for b in bindings] == [
        (KEY_SCOPE, "key"),
        ("gpt-4o-2024-08-06", "gpt4o"),
    ]
    assert [b.policy.name for b in ps.resolve("k1", "gpt-4o-mini")] == ["key", "gpt4o"]
    assert [b.policy.name for b in ps.resolve("k1", "o3")] == ["key"]
    assert ps.resolve("other", "gpt-4o") == ()


def test_specs_list_each_set_limit_with_its_window() -> None:
    ps = parse_policies(
        doc(
            {
                "name": "p",
                "default": True,
                "limits": {"tokens_per_day": 5, "requests_per_minute": 1},
            }
        )
    )
    specs = ps.policies[0].specs
    assert [(s.name, s.unit, s.window, s.limit) for s in specs] == [
        ("requests_per_minute", "requests", 60, 1),
        ("tokens_per_day", "tokens", 86400, 5),
    ]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    return path


def test_error_names_file_path_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
version: 1
policies:
  - {name: a, keys: [a], limits: {requests_per_minute: 1}}
  - {name: b, keys: [b], limits: {requests_per_minute: 1}}
  - {name: c, keys: [c], limits: {tokens_per_minute: 0}}
""",
    )
    with pytest.raises(ConfigError) as err:
        load_policies(path)
    assert str(err.value) == f"{path}: policies[2].limits.tokens_per_minute: must be > 0"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("policies: [", "not valid YAML"),
        ("- just a list", "expected a mapping"),
        ("version: 1\npolicies:\n  - {name: a, limits: {requests_per_minute: 1}}", "set 'keys'"),
        ("version: 1\npolicies:\n  - {name: a, keys: [a], limits: {}}", "at least one limit"),
        (
            "version: 1\npolicies:\n  - {name: a, keys: [a], limits: {requests_per_minute: 1}}\n"
            "  - {name: a, keys: [b], limits: {requests_per_minute: 1}}",
            "used twice",
        ),
        (
            "version: 1\npolicies:\n  - {name: a, keys: [a], limits: {rpm: 1}}",
            "policies[0].limits.rpm",
        ),
        (
            "version: 1\npolicies:\n  - {name: a, keys: [a], fail_mode: maybe, "
            "limits: {requests_per_minute: 1}}",
            "policies[0].fail_mode",
        ),
        ("version: 2\npolicies: []", "version"),
    ],
)
def test_invalid_files_are_refused_clearly(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_policies(path)
    assert str(err.value).startswith(str(path)) and fragment in str(err.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy file not found"):
        load_policies(tmp_path / "nope.yaml")
