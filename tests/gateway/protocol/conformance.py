"""Checks of emitted objects and events against the Open Responses schema and the openai SDK.

* :func:`check_response` — a Response object: the SDK's ``Response`` in strict mode (from the
  raw JSON, as a client parses it) and the spec's ``ResponseResource`` schema;
* :func:`check_event` — one SSE event: the SDK's ``ResponseStreamEvent`` union in strict mode
  and the spec's streaming event schema of that type.

Where the two cannot both hold, the SDK is followed (it is what clients run) and the spec check
covers what the spec defines:

* item and tool types the spec does not define (``mcp_call``, ``custom_tool_call``, ``custom`` /
  ``namespace`` / hosted tools) are OpenAI's own types, not slug-prefixed extensions; they are
  checked against the spec's rule for every item (``type``, ``id``, ``status`` present) and by
  the SDK in full;
* events the spec does not define (``response.mcp_call.*``, ``response.mcp_call_arguments.*``,
  ``response.custom_tool_call_input.*``) and the reasoning text events, which the spec names
  ``response.reasoning.delta`` / ``.done`` and the SDK (and OpenAI) ``response.reasoning_text.*``:
  the SDK's names are emitted; the spec check is the common event shape (``type``,
  ``sequence_number``) plus the spec's own reasoning event schema with the type renamed.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

SPEC_PATH = Path(__file__).resolve().parents[2] / "fixtures" / "openresponses" / "openapi.json"

# Event type -> the spec's schema name.
_SPEC_EVENTS = {
    "response.created": "ResponseCreatedStreamingEvent",
    "response.queued": "ResponseQueuedStreamingEvent",
    "response.in_progress": "ResponseInProgressStreamingEvent",
    "response.completed": "ResponseCompletedStreamingEvent",
    "response.failed": "ResponseFailedStreamingEvent",
    "response.incomplete": "ResponseIncompleteStreamingEvent",
    "response.output_item.added": "ResponseOutputItemAddedStreamingEvent",
    "response.output_item.done": "ResponseOutputItemDoneStreamingEvent",
    "response.content_part.added": "ResponseContentPartAddedStreamingEvent",
    "response.content_part.done": "ResponseContentPartDoneStreamingEvent",
    "response.output_text.delta": "ResponseOutputTextDeltaStreamingEvent",
    "response.output_text.done": "ResponseOutputTextDoneStreamingEvent",
    "response.refusal.delta": "ResponseRefusalDeltaStreamingEvent",
    "response.refusal.done": "ResponseRefusalDoneStreamingEvent",
    "response.reasoning_summary_part.added": "ResponseReasoningSummaryPartAddedStreamingEvent",
    "response.reasoning_summary_part.done": "ResponseReasoningSummaryPartDoneStreamingEvent",
    "response.reasoning_summary_text.delta": "ResponseReasoningSummaryDeltaStreamingEvent",
    "response.reasoning_summary_text.done": "ResponseReasoningSummaryDoneStreamingEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaStreamingEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneStreamingEvent",
    "error": "ErrorStreamingEvent",
}
# The SDK's (and OpenAI's) names for the spec's reasoning text events.
_RENAMED = {
    "response.reasoning_text.delta": ("ResponseReasoningDeltaStreamingEvent", "response.reasoning.delta"),
    "response.reasoning_text.done": ("ResponseReasoningDoneStreamingEvent", "response.reasoning.done"),
}
_EVENTS = TypeAdapter(ResponseStreamEvent)


@cache
def spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


@cache
def _validator(schema_name: str) -> jsonschema.Validator:
    document = spec()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    cls = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    return cls(schema)


@cache
def _spec_types(union: str) -> frozenset[str]:
    """The ``type`` values of the members of a spec union (``ItemField``, ``Tool``)."""
    schemas = spec()["components"]["schemas"]
    kinds = set()
    for member in schemas[union]["oneOf"]:
        name = member["$ref"].rsplit("/", 1)[1]
        kinds.update(schemas[name]["properties"]["type"].get("enum", ()))
    return frozenset(kinds)


def _check_extension_item(item: dict[str, Any]) -> None:
    missing = [key for key in ("type", "id", "status") if key not in item]
    assert not missing, f"item {item.get('type')} lacks {missing} (Open Responses item rule)"


def _spec_item(item: dict[str, Any]) -> bool:
    """Whether the spec defines ``item``'s type; else check it by the spec's extension rule."""
    if item.get("type") in _spec_types("ItemField"):
        return True
    _check_extension_item(item)
    return False


def _spec_response(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the items and tools the spec does not define taken out (checked apart)."""
    obj = dict(obj)
    obj["output"] = [item for item in obj["output"] if _spec_item(item)]
    obj["tools"] = [tool for tool in obj["tools"] if tool.get("type") in _spec_types("Tool")]
    return obj


def _spec_errors(schema_name: str, obj: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
        for e in _validator(schema_name).iter_errors(obj)
    ]


def check_response(raw: bytes | str | dict[str, Any]) -> Response:
    """Validate one Response object (raw JSON as sent, or its dict); return the SDK's model."""
    text = raw if isinstance(raw, (bytes, str)) else json.dumps(raw)
    obj = json.loads(text)
    parsed = Response.model_validate_json(text, strict=True)
    errors = _spec_errors("ResponseResource", _spec_response(obj))
    assert not errors, f"Open Responses ResponseResource: {errors}"
    return parsed


def check_event(raw: bytes | str | dict[str, Any]) -> Any:
    """Validate one streaming event (its ``data`` JSON, or dict); return the SDK's model."""
    text = raw if isinstance(raw, (bytes, str)) else json.dumps(raw)
    event = json.loads(text)
    parsed = _EVENTS.validate_json(text, strict=True)
    kind = event["type"]
    assert isinstance(event.get("sequence_number"), int), event
    if kind in _RENAMED:
        schema_name, spec_type = _RENAMED[kind]
        event = {**event, "type": spec_type}
    else:
        schema_name = _SPEC_EVENTS.get(kind)
    if schema_name is None:
        return parsed  # not in the spec: only the SDK's model applies (see the module docstring)
    if "response" in event:
        event = {**event, "response": _spec_response(event["response"])}
    if "item" in event and not _spec_item(event["item"]):
        return parsed
    errors = _spec_errors(schema_name, copy.deepcopy(event))
    assert not errors, f"Open Responses {schema_name}: {errors}"
    return parsed
