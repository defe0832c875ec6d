"""The worker's admin HTTP API: the live policy document, its history and overrides, read and
written with the same validation and concurrency checks as ``quotaflow policies`` and
``quotaflow limits``.

    GET    /api/policies            the version in force and its document       (read)
    PUT    /api/policies            publish a document as the next version      (admin)
           {"document": {...}, "message": "...", "expect_version": N, "dry_run": false}
    GET    /api/policies/history    every version with what it changed          (read)
    POST   /api/policies/rollback   {"version": N}: publish N's document again  (admin)
    GET    /api/overrides           the overrides in force                       (read)
    PUT    /api/overrides/{key}     {"limits": {...}, "model": null, "ttl_seconds": 3600,
                                     "reason": "..."}                            (admin)
    DELETE /api/overrides/{key}     clear it (``?model=`` for a model's)         (admin)
    GET    /api/openapi.json        this API as an OpenAPI 3.1 document

Reads take the worker's read token (``worker.api_token``) or the admin token; writes only the
admin token (``worker.admin_token``): none gives 401, the read token 403, and with no admin
token configured writing is off (403). A bad document is 422 naming the field; a version that
moved since ``expect_version`` is 409. Reads answer from what the worker follows (no I/O);
writes go to the policies topic in a thread, so the worker's loop never blocks on them.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from faust.web import View

from quotaflow._exceptions import ConfigError, QuotaflowError
from quotaflow.keys import bearer_token, same_secret
from quotaflow.policies import parse_limits, parse_policies
from quotaflow.policy_log import Override, PolicyLog, diff
from quotaflow.policy_topic import VersionConflict, publish, publish_override

if TYPE_CHECKING:
    from quotaflow_stream.agents import StreamWorker

#: Largest request body the admin API reads (bytes).
MAX_BODY = 1024 * 1024


class AdminAccess:
    """Who may read and who may write: the worker's read token and its admin token."""

    def __init__(self, read_token: str | None, admin_token: str | None) -> None:
        self.read_token, self.admin_token = read_token, admin_token

    def denied(self, request: Any, write: bool) -> tuple[int, str] | None:
        """(status, message) if the request may not proceed, else None."""
        token = bearer_token(request.headers.get("Authorization", ""))
        admin = (
            self.admin_token is not None
            and token is not None
            and same_secret(token, self.admin_token)
        )
        if write:
            if token is None:
                return 401, "unauthorized: send Authorization: Bearer <worker.admin_token>"
            if self.admin_token is None:
                return 403, "writing is off: set QUOTAFLOW_WORKER__ADMIN_TOKEN on the worker"
            return None if admin else (403, "forbidden: writes need the admin token")
        if self.read_token is None or admin:
            return None
        if token is None:
            return 401, "unauthorized: send Authorization: Bearer <worker.api_token>"
        return None if same_secret(token, self.read_token) else (403, "forbidden: wrong token")


def register_admin_api(worker: StreamWorker) -> None:
    """Put the admin routes on the worker's app."""
    w = worker.settings.worker
    access = AdminAccess(
        w.api_token.get_secret_value() if w.api_token else None,
        w.admin_token.get_secret_value() if w.admin_token else None,
    )
    settings = worker.settings

    def followed() -> PolicyLog:
        follower = worker.policy_follower
        return follower.log if follower is not None else PolicyLog()

    class Base(View):
        async def guarded(self, request: Any, write: bool, handler: Any) -> Any:
            refused = access.denied(request, write)
            if refused is not None:
                return self.json({"error": refused[1]}, status=refused[0])
            try:
                return await handler()
            except _BadRequest as exc:
                return self.json({"error": str(exc)}, status=exc.status)
            except VersionConflict as exc:
                return self.json({"error": str(exc)}, status=409)
            except ConfigError as exc:
                return self.json({"error": str(exc)}, status=422)
            except QuotaflowError as exc:
                return self.json({"error": str(exc)}, status=503)

        async def body(self, request: Any) -> dict[str, Any]:
            raw = await request.content.read(MAX_BODY + 1)
            if len(raw) > MAX_BODY:
                raise _BadRequest(f"body larger than {MAX_BODY} bytes", 413)
            try:
                doc = json.loads(raw or b"{}")
            except ValueError as exc:
                raise _BadRequest(f"body is not JSON: {exc}", 400) from None
            if not isinstance(doc, dict):
                raise _BadRequest("body: expected a JSON object", 400)
            return doc

    class Policies(Base):
        async def get(self, request: Any) -> Any:
            async def read() -> Any:
                live = followed().current
                if live is None:
                    return self.json({"version": None, "source": str(settings.policies_file),
                                      "document": None})  # fmt: skip
                return self.json({**live.summary(), "document": live.document})

            return await self.guarded(request, False, read)

        async def put(self, request: Any) -> Any:
            async def write() -> Any:
                doc = await self.body(request)
                document = doc.get("document")
                if not isinstance(document, dict):
                    raise _BadRequest("document: expected the policy document as an object", 422)
                new = parse_policies(document, source="document")  # 422 naming the field
                expect = _int_or_none(doc.get("expect_version"), "expect_version")
                live = followed().current
                changes = diff(live.policies if live is not None else worker.policies, new)
                if doc.get("dry_run"):
                    return self.json({"changes": changes, "live_version": _number(live)})
                written = await asyncio.to_thread(
                    publish, settings, document, author=_text(doc, "author", "admin-api"),
                    message=_text(doc, "message", ""),
                    expect_version=_number(live) or 0 if expect is None else expect,
                )  # fmt: skip
                return self.json({**written.summary(), "changes": changes})

            return await self.guarded(request, True, write)

    class History(Base):
        async def get(self, request: Any) -> Any:
            async def read() -> Any:
                log, rows, previous = followed(), [], None
                for number in sorted(log.versions):
                    v = log.versions[number]
                    rows.append(
                        {
                            **v.summary(),
                            "changes": diff(
                                previous.policies if previous is not None else None, v.policies
                            ),
                        }
                    )
                    previous = v  # fmt: skip
                overrides = [_override_row(o) for o in log.override_history]
                return self.json({"versions": rows, "overrides": overrides})

            return await self.guarded(request, False, read)

    class Rollback(Base):
        async def post(self, request: Any) -> Any:
            async def write() -> Any:
                doc = await self.body(request)
                number = _int_or_none(doc.get("version"), "version")
                log = followed()
                target = log.versions.get(number) if number is not None else None
                if target is None:
                    raise _BadRequest(f"version: no version {number} (known: "
                                      f"{sorted(log.versions)})", 404)  # fmt: skip
                written = await asyncio.to_thread(
                    publish, settings, target.document, author=_text(doc, "author", "admin-api"),
                    message=_text(doc, "message", f"rollback to version {number}"),
                    expect_version=_number(log.current),
                )  # fmt: skip
                return self.json(written.summary())

            return await self.guarded(request, True, write)

    class Overrides(Base):
        async def get(self, request: Any) -> Any:
            async def read() -> Any:
                now = time.time()
                active = [o for o in followed().overrides.values() if o.active(now)]
                return self.json({"overrides": [_override_row(o) for o in active]})

            return await self.guarded(request, False, read)

    class OneOverride(Base):
        async def put(self, request: Any, key: str) -> Any:
            async def write() -> Any:
                doc = await self.body(request)
                limits = doc.get("limits")
                if not isinstance(limits, dict):
                    raise _BadRequest("limits: expected an object like "
                                      '{"tokens_per_minute": 200000}', 422)  # fmt: skip
                parse_limits(limits, "limits")  # 422 naming the limit
                ttl = doc.get("ttl_seconds")
                if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0):
                    raise _BadRequest("ttl_seconds: expected a number of seconds > 0", 422)
                now = time.time()
                expires = now + ttl if ttl is not None else None
                reason, author = _text(doc, "reason", ""), _text(doc, "author", "admin-api")
                o = Override(key, _model(doc.get("model")), limits, expires, reason, author, now)
                await asyncio.to_thread(_send_override, settings, o)
                return self.json(_override_row(o))

            return await self.guarded(request, True, write)

        async def delete(self, request: Any, key: str) -> Any:
            async def write() -> Any:
                o = Override(key, _model(request.query.get("model")), None, None, "",
                             "admin-api", time.time())  # fmt: skip
                await asyncio.to_thread(_send_override, settings, o)
                return self.json(_override_row(o))

            return await self.guarded(request, True, write)

    class OpenApi(Base):
        async def get(self, request: Any) -> Any:
            return self.json(OPENAPI)

    app = worker.app
    app.page("/api/policies")(Policies)
    app.page("/api/policies/history")(History)
    app.page("/api/policies/rollback")(Rollback)
    app.page("/api/overrides")(Overrides)
    app.page("/api/overrides/{key}")(OneOverride)
    app.page("/api/openapi.json")(OpenApi)


class _BadRequest(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _number(version: Any) -> int | None:
    return version.version if version is not None else None


def _int_or_none(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _BadRequest(f"{field}: expected an integer >= 0", 422)
    return value


def _text(doc: dict[str, Any], field: str, default: str) -> str:
    value = doc.get(field, default)
    if not isinstance(value, str) or len(value) > 2000:
        raise _BadRequest(f"{field}: expected a string of at most 2000 characters", 422)
    return value


def _model(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise _BadRequest("model: expected a model name", 422)
    return value


def _override_row(o: Override) -> dict[str, Any]:
    return {"key": o.key, "model": o.model, "limits": o.limits, "expires_at": o.expires_at,
            "reason": o.reason, "author": o.author, "time": o.time}  # fmt: skip


def _send_override(settings: Any, o: Override) -> None:
    if not 0 < len(o.key) <= 256:
        raise _BadRequest("key: expected a counter key of 1 to 256 characters", 422)
    publish_override(settings, o)


def _path(summary: str, method: str, write: bool, body: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"admin": []}] if write else [{"read": []}, {"admin": []}],
        "responses": {"200": {"description": "done"},
                      "401": {"description": "no token"},
                      "403": {"description": "a token that may not do this"}},
    }  # fmt: skip
    if write:
        op["responses"]["409"] = {"description": "the live version moved"}
        op["responses"]["422"] = {"description": "invalid input, the field named"}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "description": body}}}}  # fmt: skip
    return {method: op}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "quotaflow worker admin API", "version": "1"},
    "components": {
        "securitySchemes": {
            "read": {"type": "http", "scheme": "bearer", "description": "worker.api_token"},
            "admin": {"type": "http", "scheme": "bearer", "description": "worker.admin_token"},
        }
    },
    "paths": {
        "/api/policies": {
            **_path("the live version and its document", "get", False),
            **_path(
                "publish the next version",
                "put",
                True,
                "document (the policy document), message, author, expect_version, dry_run",
            ),
        },
        "/api/policies/history": _path("every version and what it changed", "get", False),
        "/api/policies/rollback": _path(
            "publish version N's document again", "post", True, "version, message"
        ),
        "/api/overrides": _path("the overrides in force", "get", False),
        "/api/overrides/{key}": {
            **_path("set a key's override", "put", True, "limits, model, ttl_seconds, reason"),
            **_path("clear a key's override (?model= for a model's)", "delete", True),
        },
        "/api/openapi.json": _path("this document", "get", False),
    },
}
