"""Reading a YAML configuration file, with errors that name the file and what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quotaflow._exceptions import ConfigError


class Missing(Exception):
    """The file does not exist (callers decide whether that is an error)."""


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document at ``path`` (``what`` names it in errors: "policy file"); raises
    :class:`Missing` if there is no file, :class:`ConfigError` if it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Missing(str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
