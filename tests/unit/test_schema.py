import json
from pathlib import Path

import quotaflow
from quotaflow.record import UsageRecord, usage_record_json_schema

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "config/schema"


def test_checked_in_schema_matches_the_model() -> None:
    checked_in = json.loads((SCHEMAS / "usage-record.v2.schema.json").read_text())
    assert checked_in == usage_record_json_schema(), "run `make schema` and commit the result"


def test_v2_keeps_every_v1_field_as_it_was() -> None:
    """A v1 record is a valid v2 record: v2 only adds fields, each with a default."""
    v1 = json.loads((SCHEMAS / "usage-record.v1.schema.json").read_text())
    v2 = usage_record_json_schema()
    for name, prop in v1["properties"].items():
        # unchanged, but for a default v2 states where v1 left it implicit (attrs: {})
        assert {k: v for k, v in v2["properties"][name].items() if k not in prop} in (
            {}, {"default": {}},
        ), name  # fmt: skip
        assert {k: v2["properties"][name][k] for k in prop} == prop, name
    assert set(v2["required"]) == set(v1["required"])
    added = set(v2["properties"]) - set(v1["properties"])
    assert all("default" in v2["properties"][name] for name in added), added
    # a record written to the v1 schema, every v1 field set, reads as v2 with zeros
    doc = {
        name: prop.get("default", {"string": "x", "number": 1.5, "integer": 1}.get(
            prop.get("type", ""), "x"))
        for name, prop in v1["properties"].items()
    }  # fmt: skip
    doc.update(ts=1.7e9, status="ok", attrs={})
    record = UsageRecord.model_validate(doc)
    assert record.cached_prompt_tokens == record.images == 0 and record.cost_micros is None


def test_public_all_is_complete() -> None:
    public = {
        name
        for name in dir(quotaflow)
        if not name.startswith("_") and not isinstance(getattr(quotaflow, name), type(quotaflow))
    }
    assert public <= set(quotaflow.__all__) | {"annotations"}
    for name in quotaflow.__all__:
        assert hasattr(quotaflow, name), name
