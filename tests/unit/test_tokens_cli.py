import json
from pathlib import Path

import pytest

from quotaflow.cli import main


def test_tokens_count_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
    assert main(["tokens", "count", str(req)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"model": "gpt-4o", "kind": "chat", "encoding": "o200k_base",
                   "prompt_tokens": 8, "estimated": False}  # fmt: skip


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("{nope", "not JSON"), ("[1]", "expected a JSON object"), ('{"model": "m"}', "none of")],
)
def test_tokens_count_rejects_bad_files_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, fragment: str
) -> None:
    req = tmp_path / "req.json"
    req.write_text(content)
    assert main(["tokens", "count", str(req)]) == 2
    assert fragment in capsys.readouterr().err


def test_tokens_bench_reports_sub_millisecond_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokens", "bench", "--iterations", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 950 <= result["prompt_tokens"] <= 1000
    assert result["p50_us"] > 0 and result["iterations"] == 50
