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
