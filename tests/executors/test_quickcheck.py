"""The quick argument check never calls valid what jsonschema calls invalid (hypothesis), and
compiles only the simple schemas it knows."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executors.quickcheck import compile_quick_check

SCHEMAS = [
    pytest.param({"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}, id="bench"),
    pytest.param(
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "where"},
                "days": {"type": "integer"},
                "units": {"type": ["string", "null"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                    "additionalProperties": False,
                },
                "flag": {"type": "boolean"},
                "anything": {},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
        id="nested",
    ),
    pytest.param({"type": "object", "additionalProperties": {"type": "integer"}}, id="map-of-ints"),
    pytest.param({"type": "object", "properties": {}}, id="empty-object"),
    pytest.param({"properties": {"n": {"type": "integer"}}}, id="no-type"),
]

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["q", "city", "days", "units", "tags", "where", "lat", "lon", "flag",
                         "anything", "n", "x"]),
        children, max_size=5,
    ),
    max_leaves=12,
)  # fmt: skip


@pytest.mark.parametrize("schema", SCHEMAS)
@settings(max_examples=300, deadline=None)
@given(instance=JSON)
def test_never_valid_when_jsonschema_finds_an_error(schema: dict[str, Any], instance: Any) -> None:
    check = compile_quick_check(schema)
    assert check is not None
    valid = jsonschema.Draft202012Validator(schema).is_valid(instance)
    if check(instance):
        assert valid
    else:  # and it is exact for these schemas: the slow path runs only for invalid arguments
        assert not valid


@pytest.mark.parametrize(
    "value, ok",
    [({"q": "x"}, True), ({"q": 1}, False), ({}, False), ({"q": "x", "extra": 1}, True), ([], False)],
)
def test_the_bench_tools_schema(value: Any, ok: bool) -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    assert compile_quick_check(schema)(value) is ok  # type: ignore[misc]


@pytest.mark.parametrize(
    "schema",
    [
        pytest.param({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}, id="minimum"),
        pytest.param({"type": "object", "properties": {"e": {"enum": ["a"]}}}, id="enum"),
        pytest.param({"$schema": "http://json-schema.org/draft-04/schema#", "type": "object"}, id="draft-4"),
        pytest.param({"type": "object", "properties": {"r": {"$ref": "#/$defs/x"}}}, id="ref"),
        pytest.param({"type": "object", "anyOf": [{"required": ["a"]}]}, id="anyOf"),
        pytest.param({"type": "object", "properties": {"x": {"type": "strin"}}}, id="unknown-type"),
        pytest.param({"type": "object", "additionalProperties": False, "patternProperties": {}}, id="pattern"),
    ],
)
def test_other_keywords_are_left_to_jsonschema(schema: dict[str, Any]) -> None:
    assert compile_quick_check(schema) is None
