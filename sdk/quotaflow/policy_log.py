"""Live policies: the versioned policy document on the policies topic (``quotaflow.policies``).

Each version is a JSON message ``{"v": 1, "version": N, "author", "time", "message", "hash",
"document", "sig"}``, written twice: under ``version:<N>`` (compaction keeps every one: the
history) and under ``document`` (compaction keeps the latest: the live state for a reader that
wants only that). The version in force is the highest valid one; of two messages claiming the
same version (two writers racing), the first in the topic wins and the other is refused, so
every reader settles on the same document.

Anyone who can write the topic can write bytes to it, so every message is checked before it is
believed: its shape, its document (validated like the policy file, with the same errors), its
content hash, and, where ``policies.signing_key`` is set, its HMAC signature. A refused message
is logged with its reason and changes nothing: the version in force stays in force.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from quotaflow._exceptions import ConfigError
from quotaflow.policies import Limits, Policy, PolicySet, parse_limits, parse_policies

#: Layout of a version message.
MESSAGE_VERSION = 1

#: Largest version message read (bytes): a policy document is a few kilobytes.
MAX_MESSAGE_BYTES = 1024 * 1024

#: The key of the latest version (compacted to one message).
DOCUMENT_KEY = b"document"


def version_key(version: int) -> bytes:
    return f"version:{version}".encode()


def override_key(key: str, model: str | None) -> bytes:
    """The topic key of one counter's (and model's) override: the latest message is its state
    (compaction keeps that), earlier ones are its audit trail until compacted."""
    return f"override:{key}".encode() + (f"\x00{model}".encode() if model else b"")


class RefusedMessage(ValueError):
    """A message on the policies topic that is not a valid version (the reason says why)."""


@dataclass(frozen=True)
class PolicyVersion:
    """One version of the live policy document."""

    version: int
    author: str
    time: float
    message: str
    document: dict[str, Any]
    hash: str
    policies: PolicySet = field(compare=False, repr=False)

    def to_json(self, signing_key: str | None = None) -> bytes:
        body = self._body()
        if signing_key:
            body["sig"] = _signature(body, signing_key)
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    def _body(self) -> dict[str, Any]:
        return {
            "v": MESSAGE_VERSION,
            "version": self.version,
            "author": self.author,
            "time": self.time,
            "message": self.message,
            "hash": self.hash,
            "document": self.document,
        }

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self._body().items() if k not in ("v", "document")}


def content_hash(document: dict[str, Any]) -> str:
    """The document's sha256 over its canonical JSON (key order and spacing do not matter)."""
    canonical = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def _signature(body: dict[str, Any], signing_key: str) -> str:
    canonical = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return "hmac-sha256:" + hmac.new(signing_key.encode(), canonical, hashlib.sha256).hexdigest()


def new_version(
    document: dict[str, Any], version: int, author: str, message: str, now: float
) -> PolicyVersion:
    """Version ``version`` of ``document``, validated (raises ConfigError naming the field)."""
    policies = parse_policies(document, source=f"policy version {version}")
    if not len(policies):
        raise ConfigError(
            f"policy version {version}: no policies (every key would go unlimited); "
            "to lift every limit, say so with a default policy"
        )
    return PolicyVersion(version, author, now, message, document, content_hash(document), policies)


def read_version(raw: bytes | None, signing_key: str | None = None) -> PolicyVersion:
    """The version in a policies-topic message; raises :class:`RefusedMessage` with the reason
    if it is not one to believe."""
    found = read_message(raw, signing_key)
    if not isinstance(found, PolicyVersion):
        raise RefusedMessage("an override, not a policy version")
    return found


def read_message(raw: bytes | None, signing_key: str | None = None) -> PolicyVersion | Override:
    """The version or override in a policies-topic message; raises :class:`RefusedMessage`
    with the reason if it is not one to believe."""
    if raw is None:
        raise RefusedMessage("empty message")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise RefusedMessage(f"{len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RefusedMessage(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != MESSAGE_VERSION:
        raise RefusedMessage(f"not a policy version message (v{MESSAGE_VERSION} object)")
    sig = body.pop("sig", None)
    if signing_key and not (
        isinstance(sig, str) and hmac.compare_digest(sig, _signature(body, signing_key))
    ):
        raise RefusedMessage("bad or missing signature (policies.signing_key)")
    if body.get("kind") == "override":
        return read_override(body)
    version, author, at = body.get("version"), body.get("author"), body.get("time")
    message, document, digest = body.get("message"), body.get("document"), body.get("hash")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RefusedMessage(f"version: expected an integer >= 1, got {version!r}")
    if not isinstance(author, str) or len(author) > 200:
        raise RefusedMessage("author: expected a string of at most 200 characters")
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise RefusedMessage("time: expected epoch seconds")
    if not isinstance(message, str) or len(message) > 2000:
        raise RefusedMessage("message: expected a string of at most 2000 characters")
    if not isinstance(document, dict):
        raise RefusedMessage("document: expected an object")
    if digest != content_hash(document):
        raise RefusedMessage("hash: does not match the document")
    try:
        return new_version(document, version, author, message, float(at))
    except ConfigError as exc:
        raise RefusedMessage(str(exc)) from None


@dataclass(frozen=True)
class Override:
    """A temporary boost or clamp of one counter's limits (and model's, or key-wide), on top
    of the policy that binds it; ``limits`` None clears it."""

    key: str
    model: str | None
    limits: dict[str, Any] | None  # as a policy's limits mapping states them (dollars)
    expires_at: float | None
    reason: str
    author: str
    time: float

    def active(self, now: float) -> bool:
        return self.limits is not None and (self.expires_at is None or now < self.expires_at)

    def to_json(self, signing_key: str | None = None) -> bytes:
        body = {"v": MESSAGE_VERSION, "kind": "override", "key": self.key, "model": self.model,
                "limits": self.limits, "expires_at": self.expires_at, "reason": self.reason,
                "author": self.author, "time": self.time}  # fmt: skip
        if signing_key:
            body["sig"] = _signature(body, signing_key)
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def read_override(body: dict[str, Any]) -> Override:
    """The override in a message body already checked for shape and signature."""
    key, model, limits = body.get("key"), body.get("model"), body.get("limits")
    expires, reason = body.get("expires_at"), body.get("reason", "")
    author, at = body.get("author", ""), body.get("time")
    if not isinstance(key, str) or not 0 < len(key) <= 256:
        raise RefusedMessage("key: expected a counter key of 1 to 256 characters")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 256):
        raise RefusedMessage("model: expected a model name or null")
    if expires is not None and (not isinstance(expires, int | float) or isinstance(expires, bool)):
        raise RefusedMessage("expires_at: expected epoch seconds or null")
    if not isinstance(reason, str) or len(reason) > 2000 or not isinstance(author, str):
        raise RefusedMessage("reason, author: expected short strings")
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise RefusedMessage("time: expected epoch seconds")
    if limits is not None:
        if not isinstance(limits, dict):
            raise RefusedMessage("limits: expected an object or null")
        try:
            parse_limits(limits)
        except ConfigError as exc:
            raise RefusedMessage(str(exc)) from None
    return Override(key, model, limits, None if expires is None else float(expires),
                    reason, author, float(at))  # fmt: skip


@dataclass
class PolicyLog:
    """What the topic holds: every valid version (the first message of each) and the
    refusals, in topic order."""

    versions: dict[int, PolicyVersion] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    #: The latest override message of each (key, model), cleared ones included.
    overrides: dict[tuple[str, str | None], Override] = field(default_factory=dict)
    #: Every override message, in topic order (what ``limits`` commands audit).
    override_history: list[Override] = field(default_factory=list)

    def active_overrides(self, now: float) -> dict[tuple[str, str | None], Limits]:
        """The overrides in force at ``now``, as limits (validated when read)."""
        return {
            pair: parse_limits(o.limits)
            for pair, o in self.overrides.items()
            if o.active(now) and o.limits is not None
        }

    def add(self, raw: bytes | None, where: str, signing_key: str | None = None) -> bool:
        """Take one message; True if it made a newer version current or changed an
        override."""
        try:
            found = read_message(raw, signing_key)
        except RefusedMessage as exc:
            self.refused.append(f"{where}: {exc}")
            return False
        if isinstance(found, Override):
            self.overrides[(found.key, found.model)] = found
            self.override_history.append(found)
            return True
        known = self.versions.get(found.version)
        if known is not None:
            if known.hash != found.hash or known.time != found.time:
                self.refused.append(
                    f"{where}: version {found.version} was already written by "
                    f"{known.author} at {known.time}; this later claim is ignored"
                )
            return False
        newest = self.current
        self.versions[found.version] = found
        return newest is None or found.version > newest.version

    @property
    def current(self) -> PolicyVersion | None:
        return self.versions[max(self.versions)] if self.versions else None


def diff(old: PolicySet | None, new: PolicySet) -> list[str]:
    """What changes from ``old`` to ``new``: policies added (+) and removed (-), and for each
    changed policy (~) every setting and limit that differs, old -> new."""
    before = {p.name: p for p in old.policies} if old is not None else {}
    after = {p.name: p for p in new.policies}
    lines = [f"+ policy {name}: {_describe(after[name])}" for name in after if name not in before]
    lines += [f"- policy {name}" for name in before if name not in after]
    for name in after:
        if name in before and before[name] != after[name]:
            lines += [f"~ {name}: {change}" for change in _changes(before[name], after[name])]
    return lines


def _describe(p: Policy) -> str:
    target = "default" if p.default else ",".join(p.keys)
    limits = ", ".join(f"{s.name}={s.show(s.limit)}" for s in p.specs)
    return f"keys={target} [{limits}]"


def _changes(old: Policy, new: Policy) -> list[str]:
    out = []
    old_specs = {s.name: s for s in old.specs}
    new_specs = {s.name: s for s in new.specs}
    for name in sorted(old_specs.keys() | new_specs.keys()):
        was, now = old_specs.get(name), new_specs.get(name)
        if was is None and now is not None:
            out.append(f"{name} added = {now.show(now.limit)}")
        elif now is None and was is not None:
            out.append(f"{name} removed (was {was.show(was.limit)})")
        elif was is not None and now is not None and was.limit != now.limit:
            out.append(f"{name} {was.show(was.limit)} -> {now.show(now.limit)}")
    old_rest = old.model_dump(exclude={"limits", "name"})
    new_rest = new.model_dump(exclude={"limits", "name"})
    for setting in old_rest:
        if old_rest[setting] != new_rest[setting]:
            out.append(f"{setting} {old_rest[setting]!r} -> {new_rest[setting]!r}")
    return out
