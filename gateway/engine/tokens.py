"""Token counts of a request as the upstream would see it (``POST /v1/responses/input_tokens``).

The request is prepared exactly as ``POST /v1/responses`` would prepare it (history of
``previous_response_id``, expanded compaction items, instructions, offered tools) into the Chat
Completions body of its first model call; then:

1. **The upstream's own count** where it offers one: vLLM's ``POST /tokenize`` with ``messages``
   (``{"count": N}``), or llama.cpp server's ``POST /apply-template`` + ``POST /tokenize``
   (``{"tokens": [...]}``), both at the server root. Which one works is found out on first use
   and remembered for the process (an upstream that has neither is not asked again).
2. Otherwise **an estimate**, :func:`gateway.protocol.context_window.estimate_tokens`: 4 tokens per message plus one per four
   UTF-8 bytes of its text (arguments and tool outputs included), 85 per image or file part, one
   per four bytes of the tools' JSON, plus 3 for the reply's priming. It is close for English
   text and overcounts code and most other languages less than it undercounts none; no tokenizer
   file is downloaded at run time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from executors.upstream import UpstreamError as UpstreamCallError
from gateway.protocol.context_window import estimate_tokens

if TYPE_CHECKING:
    from executors.resilience import ResilientUpstream

    from .service import ResponsesService

__all__ = ["TokenCounter", "count_input_tokens", "estimate_tokens"]

logger = logging.getLogger("stepchain.tokens")

class TokenCounter:
    """Counts with the upstream's tokenizer when it has one; remembers which kind it has."""

    def __init__(self, upstream: ResilientUpstream) -> None:
        self.upstream = upstream
        # None: not probed yet; "vllm", "llamacpp" or "none".
        self.mode: str | None = None

    async def count(self, body: dict[str, Any], *, upstream_key: str | None = None) -> int:
        """Tokens of the Chat Completions ``body``'s prompt (see the module docstring)."""
        upstream = self.upstream.with_api_key(upstream_key) if upstream_key else self.upstream
        if self.mode != "none":
            try:
                counted = await self._upstream_count(upstream, body)
            except UpstreamCallError as exc:  # unreachable now: estimate, probe again later
                logger.info("token count: upstream tokenizer unreachable: %s", exc.message)
                counted = None
            if counted is not None:
                return counted
        return estimate_tokens(body)

    async def _upstream_count(self, upstream: ResilientUpstream, body: dict[str, Any]) -> int | None:
        messages = body.get("messages") or []
        if self.mode in (None, "vllm"):
            request: dict[str, Any] = {"messages": messages, "add_generation_prompt": True}
            if body.get("model"):
                request["model"] = body["model"]
            if body.get("tools"):
                request["tools"] = body["tools"]
            answer = await upstream.post("/tokenize", request)
            if answer.status_code in (400, 422) and "tools" in request:
                del request["tools"]  # an older vLLM: count the messages at least
                answer = await upstream.post("/tokenize", request)
            count = _json(answer).get("count") if answer.status_code == 200 else None
            if isinstance(count, int) and not isinstance(count, bool):
                self.mode = "vllm"
                return count
            if self.mode == "vllm":
                return None  # a vLLM that refused this request: estimate it
        if self.mode in (None, "llamacpp"):
            templated = await upstream.post("/apply-template", {"messages": messages})
            prompt = _json(templated).get("prompt") if templated.status_code == 200 else None
            if isinstance(prompt, str):
                answer = await upstream.post("/tokenize", {"content": prompt})
                tokens = _json(answer).get("tokens") if answer.status_code == 200 else None
                if isinstance(tokens, list):
                    self.mode = "llamacpp"
                    return len(tokens)
            if self.mode == "llamacpp":
                return None
        self.mode = "none"
        logger.info("token count: the upstream offers no tokenizer; using the estimate")
        return None


def _json(response: Any) -> dict[str, Any]:
    try:
        value = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


async def count_input_tokens(
    service: ResponsesService,
    counter: TokenCounter,
    body: dict[str, Any],
    tenant: str | None,
    *,
    upstream_key: str | None = None,
) -> int:
    """``POST /v1/responses/input_tokens``: the input tokens of the create body ``body``
    (``model`` optional). Raises the same 400s as ``POST /v1/responses`` would."""
    request = {k: v for k, v in body.items() if k not in ("stream", "background", "store")}
    if request.get("model") is None:
        request["model"] = "default"
    prepared = await service.prepare(request, tenant)
    chat_body = dict(prepared.loop_request.initial_body)
    if body.get("model") is None:
        chat_body.pop("model", None)
    return await counter.count(chat_body, upstream_key=upstream_key)
