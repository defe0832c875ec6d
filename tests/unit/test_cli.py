from pathlib import Path

import pytest

from quotaflow.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_policies_check_lists_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policies", "check", str(ROOT / "config/policies.yaml")]) == 0
    assert "policies OK" in capsys.readouterr().out


def test_policies_check_reports_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("policies:\n  - {name: a, keys: [a], limits: {requests_per_minute: -1}}\n")
    assert main(["policies", "check", str(bad)]) == 2
    assert "policies[0].limits.requests_per_minute: must be > 0" in capsys.readouterr().err


def test_role_commands_are_plugged_in(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("worker", "dev", "demo", "policies", "schema", "tokens"):
        assert command in out


def test_bad_arguments_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--duration", "-3"])
    assert exc.value.code == 2
    assert "must be > 0" in capsys.readouterr().err


def test_prices_show_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    example = str(ROOT / "config/prices.yaml")
    assert main(["prices", "check", example]) == 0
    assert "aliases OK" in capsys.readouterr().out
    assert main(["prices", "show", "gpt4o", "--file", example, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["model"], doc["provider"], doc["prices"]["input_mtok"]) == (
        "gpt-4o",
        "openai",
        "2.5",
    )
    assert doc["example"]["cost_micros"] == 12_500 and doc["price_version"].startswith("genai-")
    assert main(["prices", "show", "ft:gpt-4o-mini:acme:x", "--file", example]) == 0
    assert "prices.yaml" in capsys.readouterr().out
    assert main(["prices", "show", "gpt-4o-mnii", "--file", example]) == 2
    assert "nearest known: gpt-4o-mini" in capsys.readouterr().err
    bad = tmp_path / "prices.yaml"
    bad.write_text(
        "models:\n  - {match: m, prices: {input_mtok: -2}}\naliases: {a: no-such-model}\n"
    )
    assert main(["prices", "check", str(bad)]) == 2
    assert "models[0].prices.input_mtok" in capsys.readouterr().err
    bad.write_text("aliases: {a: no-such-model-x}\n")
    assert main(["prices", "check", str(bad)]) == 1
    assert "a -> no-such-model-x: no price" in capsys.readouterr().out
    assert main(["prices", "check", str(tmp_path / "missing.yaml")]) == 2
