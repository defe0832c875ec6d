"""Counter keys from credentials: an HMAC id, so the raw secret never leaves the process."""

from __future__ import annotations

import hashlib
import hmac


def key_id(secret: str, salt: str | bytes) -> str:
    """A stable, non-reversible counter key for an API key (``k_`` + 24 hex chars).

    The salt must be kept private and be the same across the fleet, so every instance maps a
    credential to the same counter while nobody can test guesses against published ids.
    """
    salt_bytes = salt.encode() if isinstance(salt, str) else salt
    if not salt_bytes:
        raise ValueError("key_id needs a non-empty salt")
    digest = hmac.new(salt_bytes, secret.encode(), hashlib.sha256).hexdigest()
    return "k_" + digest[:24]


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    return authorization[len("Bearer ") :] if authorization.startswith("Bearer ") else None


def same_secret(given: str, expected: str) -> bool:
    """Compare a presented token with the configured one in constant time."""
    return hmac.compare_digest(given.encode(), expected.encode())
