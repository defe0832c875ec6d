"""Which counter key a gateway request counts under. A caller's API key is turned into an HMAC
id at once; the raw key is never stored, logged or sent anywhere but the upstream."""

from __future__ import annotations

from collections.abc import Mapping

from quotaflow.keys import key_id
from quotaflow.settings import GatewaySettings


def bearer_token(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    # Azure OpenAI style, then Anthropic's
    return headers.get("api-key") or headers.get("x-api-key") or None


def resolve_key(
    headers: Mapping[str, str], remote: str | None, settings: GatewaySettings
) -> str | None:
    """The counter key from the configured sources, first match wins; None if none applies."""
    for source in settings.key_sources:
        if source == "header":
            value = headers.get(settings.key_header, "").strip()
        elif source == "organization":
            value = headers.get("OpenAI-Organization", "").strip()
        elif source == "api_key":
            token = bearer_token(headers)
            value = key_id(token, settings.key_salt.get_secret_value()) if token else ""
        else:
            value = f"ip:{remote}" if remote else ""
        if value:
            return value
    return None
