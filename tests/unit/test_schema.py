import json
from pathlib import Path

import quotaflow
from quotaflow.record import usage_record_json_schema

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_schema_matches_the_model() -> None:
    checked_in = json.loads((ROOT / "config/schema/usage-record.schema.json").read_text())
    assert checked_in == usage_record_json_schema(), "run `make schema` and commit the result"


def test_public_all_is_complete() -> None:
    public = {
        name
        for name in dir(quotaflow)
        if not name.startswith("_") and not isinstance(getattr(quotaflow, name), type(quotaflow))
    }
    assert public <= set(quotaflow.__all__) | {"annotations"}
    for name in quotaflow.__all__:
        assert hasattr(quotaflow, name), name
