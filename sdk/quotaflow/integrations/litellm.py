"""A LiteLLM callback: LiteLLM proxy replicas and SDK users share one fleet-wide budget.

    import litellm
    from quotaflow.integrations.litellm import QuotaflowCallback

    litellm.callbacks = [QuotaflowCallback()]      # a QuotaClient from QUOTAFLOW_* settings

On the LiteLLM proxy, put a one-line module beside its config (the proxy loads callbacks from
files next to it), ``quotaflow_callbacks.py``::

    from quotaflow.integrations.litellm import proxy_handler_instance

and in the config::

    litellm_settings:
      callbacks: quotaflow_callbacks.proxy_handler_instance

Before a call, the call is reserved in the embedded :class:`QuotaClient` (no I/O: the prompt
counted locally plus the output ceiling); over a limit, it raises LiteLLM's own
``RateLimitError``, so the proxy answers 429 and the Router does not send it. LiteLLM runs such
hooks for async calls only (``acompletion``, ``aembedding``, ``aresponses``,
``aimage_generation``, the Router's, and so every proxy request); its sync calls
(``litellm.completion``, ``Router.completion``) have no hook that sees the request and can stop
it, so those are recorded but not refused. After a call (success or failure alike), the usage
LiteLLM reports is recorded (tokens with their cache and reasoning parts, images), priced by
quotaflow's table (LiteLLM's own figure is kept in the record's ``attrs``), under the call's id,
so a call is counted once whichever of LiteLLM's callbacks fire.

The counter key is, in order: ``metadata["quotaflow_key"]``, the proxy's team id, the proxy's
hash of the caller's virtual key (never the key), the request's ``user``, else ``"litellm"``;
pass ``key=`` (a string or a function of the request kwargs) to choose.

LiteLLM fetches its price map from the network at import unless
``LITELLM_LOCAL_MODEL_COST_MAP=True``; quotaflow never needs it (set it where there is no
network).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger

from quotaflow._exceptions import QuotaExceeded, RecordError
from quotaflow.billed import billed_usage
from quotaflow.client import QuotaClient
from quotaflow.reservation import Reservation
from quotaflow.tokens import image_count

__all__ = ["QuotaflowCallback", "default_key", "proxy_handler_instance"]

KeyFn = Callable[[Mapping[str, Any]], str]
#: LiteLLM call types and the request kind their body is counted as.
_KINDS = {
    "completion": "chat", "acompletion": "chat",
    "text_completion": "completion", "atext_completion": "completion",
    "embedding": "embedding", "aembedding": "embedding",
    "responses": "responses", "aresponses": "responses",
    "image_generation": "images", "aimage_generation": "images",
    "anthropic_messages": "messages",
}  # fmt: skip
#: Request fields that say what a call costs (the rest is LiteLLM's plumbing).
_BODY_FIELDS = ("messages", "prompt", "input", "instructions", "tools", "functions", "system",
                "max_tokens", "max_completion_tokens", "max_output_tokens", "n")  # fmt: skip
#: Call ids remembered as recorded: LiteLLM may run both its sync and async success callbacks.
_RECORDED_MEMORY = 10_000


def _metadata(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    for source in (kwargs.get("litellm_metadata"), kwargs.get("metadata"),
                   (kwargs.get("litellm_params") or {}).get("metadata")):  # fmt: skip
        if isinstance(source, Mapping) and source:
            return source
    return {}


def default_key(kwargs: Mapping[str, Any]) -> str:
    """The counter key of a LiteLLM call (see the module docstring)."""
    meta = _metadata(kwargs)
    for field in ("quotaflow_key", "user_api_key_team_id", "user_api_key_hash"):
        value = meta.get(field)
        if isinstance(value, str) and value:
            return value
    user = kwargs.get("user")
    return user if isinstance(user, str) and user else "litellm"


def _model_and_provider(kwargs: Mapping[str, Any]) -> tuple[str, str | None]:
    """``openai/gpt-4o`` is model ``gpt-4o`` of provider ``openai``."""
    model = str(kwargs.get("model") or "")
    params = kwargs.get("litellm_params") or {}
    provider = params.get("custom_llm_provider") if isinstance(params, Mapping) else None
    prefix, sep, rest = model.partition("/")
    if sep and rest:
        return rest, provider or prefix
    return model, provider


def _call_type(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


class QuotaflowCallback(CustomLogger):
    """Admits LiteLLM calls against quotaflow's fleet-wide limits and records their usage."""

    def __init__(self, quota: QuotaClient | None = None, key: str | KeyFn = default_key) -> None:
        super().__init__()
        self._quota = quota
        self.key = key
        self._reservations: dict[str, Reservation] = {}
        self._recorded: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def quota(self) -> QuotaClient:
        if self._quota is None:  # the proxy builds the callback at import: open on first use
            with self._lock:
                if self._quota is None:
                    self._quota = QuotaClient().open()
        return self._quota

    def _key(self, kwargs: Mapping[str, Any]) -> str:
        return self.key(kwargs) if callable(self.key) else self.key

    # -- before ------------------------------------------------------------------------------

    def admit(self, kwargs: Mapping[str, Any], call_type: Any) -> None:
        """Reserve the call, or raise ``litellm.RateLimitError``."""
        call_id = kwargs.get("litellm_call_id")
        if not isinstance(call_id, str) or call_id in self._reservations:
            return
        kind = _KINDS.get(_call_type(call_type).removeprefix("CallTypes."))
        model, provider = _model_and_provider(kwargs)
        if kind is None or not model:
            return
        body = {f: kwargs[f] for f in _BODY_FIELDS if kwargs.get(f) is not None}
        body["model"] = model
        try:
            reservation = self.quota.reserve(
                self._key(kwargs), model, body, kind=kind, provider=provider,
                images=image_count(body) if kind == "images" else 0,
            )  # fmt: skip
        except QuotaExceeded as exc:
            self._done(call_id)  # never sent: LiteLLM's failure callback has nothing to record
            raise litellm.RateLimitError(
                message=f"quotaflow: {exc}", llm_provider=provider or "", model=model
            ) from None
        except (RecordError, ValueError):
            return  # not ours to judge: the provider answers a malformed call
        self._reservations[call_id] = reservation

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: Any
    ) -> dict[str, Any] | None:
        self.admit(kwargs, call_type)
        return None

    # -- after -------------------------------------------------------------------------------

    def settle(self, kwargs: Mapping[str, Any], response: Any, failed: bool) -> None:
        """Record the call's usage once (LiteLLM may report it through several callbacks)."""
        call_id = kwargs.get("litellm_call_id")
        if not isinstance(call_id, str):
            return
        if not self._done(call_id):
            return
        reservation = self._reservations.pop(call_id, None)
        usage = None if failed else getattr(response, "usage", None)
        if usage is None and isinstance(response, Mapping):
            usage = response.get("usage")
        data = getattr(response, "data", None)
        images = len(data) if isinstance(data, list) and not failed else None
        attrs = {}
        cost = kwargs.get("response_cost")
        if isinstance(cost, int | float) and not failed:
            attrs["litellm_cost_usd"] = f"{cost:.8f}"
        if reservation is not None:
            reservation.attrs = {**(reservation.attrs or {}), **attrs}
            if failed:
                reservation.settle(prompt_tokens=0, completion_tokens=0, images=0,
                                   status="error")  # fmt: skip
            else:
                reservation.settle(usage, images=images)
            return
        # a call no hook admitted (sync litellm.completion): recorded all the same
        model, provider = _model_and_provider(kwargs)
        if not model:
            return
        billed = None if failed else billed_usage(usage, provider)
        # a record quotaflow cannot express (a model id too long) is left to LiteLLM's own logs
        with contextlib.suppress(RecordError):
            self.quota.record(
                self._key(kwargs), model, id=call_id, provider=provider, attrs=attrs or None,
                prompt_tokens=billed.prompt_tokens if billed else 0,
                completion_tokens=billed.completion_tokens if billed else 0,
                cached_prompt_tokens=billed.cached_prompt_tokens if billed else 0,
                cache_write_tokens=billed.cache_write_tokens if billed else 0,
                reasoning_tokens=billed.reasoning_tokens if billed else 0,
                images=images or 0, status="error" if failed else "ok",
                estimated=billed is None and not failed,
            )  # fmt: skip

    def _done(self, call_id: str) -> bool:
        """Mark a call as dealt with; False if it already was."""
        with self._lock:
            if call_id in self._recorded:
                return False
            self._recorded[call_id] = None
            if len(self._recorded) > _RECORDED_MEMORY:
                self._recorded.popitem(last=False)
            return True

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any,
                          end_time: Any) -> None:  # fmt: skip
        self.settle(kwargs, response_obj, failed=False)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any,
                                      end_time: Any) -> None:  # fmt: skip
        self.settle(kwargs, response_obj, failed=False)

    def log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any,
                          end_time: Any) -> None:  # fmt: skip
        self.settle(kwargs, response_obj, failed=True)

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any,
                                      end_time: Any) -> None:  # fmt: skip
        self.settle(kwargs, response_obj, failed=True)


#: What the proxy's config names (``callbacks: quotaflow_callbacks.proxy_handler_instance``):
#: its QuotaClient is made from the QUOTAFLOW_* environment on the first call.
proxy_handler_instance = QuotaflowCallback()
