"""Whether an environment variable name is a quotaflow setting (what pydantic-settings reads)."""

from __future__ import annotations

from pydantic import BaseModel

from quotaflow.settings import QuotaflowSettings


def settings_field(name: str) -> bool:
    """Whether QUOTAFLOW_A__B names a field of the settings model."""
    model: type[BaseModel] = QuotaflowSettings
    parts = name.removeprefix("QUOTAFLOW_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True
