"""A local provider-like upstream, for tests, benchmarks and trying the gateway offline.

OpenAI's chat completions (plain and streamed, with or without the final usage chunk),
completions, embeddings, Responses (plain and streamed), image generations and edits, and
Anthropic's Messages (plain and streamed) with ``count_tokens``: each reports usage in its API's
own shape, counted with tiktoken (plus ``usage_offset``, so tests can tell reported figures from
local ones). It runs on a loopback port in a thread of the calling process and remembers what it
received and reported, so tests can compare. Model ``stub-429`` answers like a provider over its
own limit, in that API's error shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any

from aiohttp import web

from quotaflow.tokens import count_request, count_text

REPLY = "Sure. Here is a short answer from the stub server, word by word."


class OpenAIStub:
    def __init__(self, port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        #: The path of every request that reached this server, whatever its route or answer.
        self.received: list[str] = []
        #: The Authorization header of each request, to check what a proxy forwarded.
        self.authorizations: list[str | None] = []
        #: The W3C ``traceparent`` of each request: whether a proxy continued the caller's trace.
        self.traceparents: list[str | None] = []
        #: Bodies of ``/v1/messages/count_tokens`` requests.
        self.received_counts: list[dict[str, Any]] = []
        #: Every usage object this server reported, in order.
        self.reported: list[dict[str, Any]] = []
        #: Added to every token count it reports, as a provider whose tokenizer differs from
        #: the gateway's estimate: tests can tell reported usage from counted content.
        self.usage_offset = 0
        #: Prompt tokens it reports as read from its cache, and reasoning tokens it adds to
        #: each completion, in OpenAI's shape (``prompt_tokens_details.cached_tokens`` within
        #: ``prompt_tokens``, ``completion_tokens_details.reasoning_tokens`` within
        #: ``completion_tokens``); 0 leaves the details out, as for models without them.
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        #: Anthropic's cache writes (``cache_creation_input_tokens``) it reports per message.
        self.cache_write_tokens = 0
        self.chunk_delay = 0.0
        #: Streams this server wrote to their end (a stream its client left stays unfinished).
        self.streams_finished = 0
        #: Seconds to wait before answering at all (to provoke client timeouts).
        self.response_delay = 0.0
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> OpenAIStub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._note])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/images/generations", self._images)
        app.router.add_post("/v1/images/edits", self._images)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    @web.middleware
    async def _note(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.received.append(request.path)
        result: web.StreamResponse = await handler(request)
        return result

    async def _body(self, request: web.Request) -> dict[str, Any]:
        body = await request.json()
        self.requests.append(body)
        self.authorizations.append(request.headers.get("Authorization"))
        self.traceparents.append(request.headers.get("traceparent"))
        if self.response_delay:
            await asyncio.sleep(self.response_delay)
        return body

    @staticmethod
    def _invalid(param: str) -> web.Response:
        """What a provider answers a body without a field it needs: 400, never a crash."""
        return web.json_response(
            {"error": {"message": f"'{param}' is a required property", "param": param,
                       "type": "invalid_request_error", "code": None}},
            status=400,
        )  # fmt: skip

    @staticmethod
    def _rate_limited() -> web.Response:
        return web.json_response(
            {"error": {"message": "upstream limit", "type": "requests", "param": None,
                       "code": "rate_limit_exceeded"}},
            status=429, headers={"retry-after": "1", "x-should-retry": "false"},
        )  # fmt: skip

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if not isinstance(body.get("messages"), list):
            return self._invalid("messages")
        if body["model"] == "stub-429":
            return self._rate_limited()
        usage = self._usage(body)
        base = {"id": "chatcmpl-stub", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            return web.json_response({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": REPLY}}],
                "usage": usage,
            })  # fmt: skip
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        # The client may close the stream early, as the cancel test does.
        with contextlib.suppress(ConnectionResetError):
            await self._stream(resp, body, base, usage)
        return resp

    def _usage(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = count_request(body).tokens + self.usage_offset
        completion = count_text(REPLY, body["model"]) + self.usage_offset + self.reasoning_tokens
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}  # fmt: skip
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": min(self.cached_tokens, prompt)}
        if self.reasoning_tokens:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        self.reported.append(usage)
        return usage

    async def _stream(
        self, resp: web.StreamResponse, body: dict[str, Any], base: dict[str, Any],
        usage: dict[str, Any],
    ) -> None:  # fmt: skip
        words = REPLY.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        # the last choice chunk says why the reply ended, as the real API's does
        stop = {"index": 0, "delta": {}, "finish_reason": "stop"}
        done = {**base, "object": "chat.completion.chunk", "choices": [stop]}
        await resp.write(b"data: " + json.dumps(done).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            final = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self.streams_finished += 1

    async def _completions(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not isinstance(body.get("prompt"), str | list):
            return self._invalid("prompt")
        prompt = count_request(body).tokens + self.usage_offset
        completion = count_text(REPLY, body["model"]) + self.usage_offset
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}  # fmt: skip
        self.reported.append(usage)
        return web.json_response({
            "id": "cmpl-stub", "object": "text_completion", "model": body["model"],
            "choices": [{"index": 0, "text": REPLY, "finish_reason": "stop"}],
            "usage": usage,
        })  # fmt: skip

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not isinstance(body.get("input"), str | list):
            return self._invalid("input")
        prompt = count_request(body).tokens + self.usage_offset
        self.reported.append({"prompt_tokens": prompt, "completion_tokens": 0})
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response({
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": i, "embedding": [0.0, 0.1]}
                     for i in range(len(inputs))],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        })  # fmt: skip

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})

    # -- OpenAI Responses ---------------------------------------------------------------------

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if not isinstance(body.get("input"), str | list) or not isinstance(body.get("model"), str):
            return self._invalid("input")
        if body["model"] == "stub-429":
            return self._rate_limited()
        prompt = count_request(body, kind="responses").tokens + self.usage_offset
        output = count_text(REPLY, body["model"]) + self.usage_offset + self.reasoning_tokens
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": min(self.cached_tokens, prompt)},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": prompt + output,
        }
        self.reported.append(usage)
        message = {"type": "message", "id": "msg_stub", "role": "assistant", "status":
                   "completed", "content": [{"type": "output_text", "text": REPLY,
                                             "annotations": []}]}  # fmt: skip
        response = {"id": "resp_stub", "object": "response", "created_at": int(time.time()),
                    "model": body["model"], "status": "completed", "output": [message],
                    "usage": usage, "parallel_tool_calls": True, "tool_choice": "auto",
                    "tools": []}  # fmt: skip
        if not body.get("stream"):
            return web.json_response(response)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            created = {**response, "status": "in_progress", "output": [], "usage": None}
            await self._event(resp, "response.created", {"response": created})
            for piece in self._pieces():
                await self._event(resp, "response.output_text.delta",
                                  {"item_id": "msg_stub", "output_index": 0,
                                   "content_index": 0, "delta": piece})  # fmt: skip
            await self._event(resp, "response.completed", {"response": response})
            await resp.write_eof()
            self.streams_finished += 1
        return resp

    def _pieces(self) -> list[str]:
        words = REPLY.split(" ")
        return [word if i == 0 else " " + word for i, word in enumerate(words)]

    async def _event(self, resp: web.StreamResponse, kind: str, data: dict[str, Any]) -> None:
        """One server-sent event as the Responses and Messages APIs write them."""
        payload = json.dumps({"type": kind, **data}).encode()
        await resp.write(b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n")
        if self.chunk_delay:
            await asyncio.sleep(self.chunk_delay)

    # -- OpenAI images ------------------------------------------------------------------------

    async def _images(self, request: web.Request) -> web.Response:
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            body: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
            self.requests.append(body)
            self.authorizations.append(request.headers.get("Authorization"))
            self.traceparents.append(request.headers.get("traceparent"))
        else:
            body = await self._body(request)
        if not isinstance(body.get("prompt"), str):
            return self._invalid("prompt")
        model = body.get("model") or "dall-e-2"
        n = int(body.get("n") or 1)
        reported: dict[str, Any] = {"images": n}
        answer: dict[str, Any] = {"created": int(time.time()),
                                  "data": [{"b64_json": "aW1hZ2U="} for _ in range(n)]}  # fmt: skip
        if model.startswith("gpt-image"):
            # token-priced image models report tokens: the prompt's, and the images'
            prompt = count_request({"prompt": body["prompt"]}, model, "images").tokens
            inputs = prompt + self.usage_offset
            usage = {"input_tokens": inputs, "output_tokens": 1056 * n,
                     "total_tokens": inputs + 1056 * n,
                     "input_tokens_details": {"text_tokens": inputs,
                                              "image_tokens": 0}}  # fmt: skip
            answer["usage"] = usage
            reported.update(usage)
        self.reported.append(reported)
        return web.json_response(answer)

    # -- Anthropic Messages -------------------------------------------------------------------

    @staticmethod
    def _anthropic_error(status: int, kind: str, message: str) -> web.Response:
        body = {"type": "error", "error": {"type": kind, "message": message}}
        headers = {"retry-after": "1"} if status == 429 else None
        return web.json_response(body, status=status, headers=headers)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if not isinstance(body.get("messages"), list):
            return self._anthropic_error(400, "invalid_request_error", "messages: Field required")
        if not isinstance(body.get("max_tokens"), int):
            return self._anthropic_error(400, "invalid_request_error", "max_tokens: Field required")
        if body.get("model") == "stub-429":
            return self._anthropic_error(429, "rate_limit_error", "upstream limit")
        prompt = count_request(body, kind="messages").tokens + self.usage_offset
        read = min(self.cached_tokens, prompt)
        write = min(self.cache_write_tokens, prompt - read)
        output = count_text(REPLY, body["model"]) + self.usage_offset
        # Anthropic's shape: input_tokens excludes the cache reads and writes
        usage = {"input_tokens": prompt - read - write, "cache_creation_input_tokens": write,
                 "cache_read_input_tokens": read, "output_tokens": output}  # fmt: skip
        self.reported.append(usage)
        message = {"id": "msg_stub", "type": "message", "role": "assistant",
                   "model": body["model"], "content": [{"type": "text", "text": REPLY}],
                   "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}  # fmt: skip
        if not body.get("stream"):
            return web.json_response(message)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            start = {**message, "content": [], "stop_reason": None,
                     "usage": {**usage, "output_tokens": 1}}  # fmt: skip
            await self._event(resp, "message_start", {"message": start})
            block = {"type": "text", "text": ""}
            await self._event(resp, "content_block_start", {"index": 0, "content_block": block})
            for piece in self._pieces():
                delta = {"type": "text_delta", "text": piece}
                await self._event(resp, "content_block_delta", {"index": 0, "delta": delta})
            await self._event(resp, "content_block_stop", {"index": 0})
            await self._event(resp, "message_delta",
                              {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": output}})  # fmt: skip
            await self._event(resp, "message_stop", {})
            await resp.write_eof()
            self.streams_finished += 1
        return resp

    async def _count_tokens(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self._anthropic_error(400, "invalid_request_error", "body: invalid JSON")
        self.received_counts.append(body)
        if not isinstance(body.get("messages"), list):
            return self._anthropic_error(400, "invalid_request_error", "messages: Field required")
        try:  # Anthropic's own count: what the stub would report as the prompt
            counted = count_request(body, kind="messages").tokens + self.usage_offset
        except ValueError as exc:
            return self._anthropic_error(400, "invalid_request_error", str(exc))
        return web.json_response({"input_tokens": counted})
