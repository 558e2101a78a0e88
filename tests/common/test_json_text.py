"""JSON text from clients, nested to hurt: refused with an error that names the field, never a
RecursionError (a 500) and never minutes of grammar building, wherever JSON arrives as text."""

from __future__ import annotations

import json

import pytest

from pagedserve.common import structured
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.json_text import MAX_DEPTH, depth_over, load_json_text, text_nests_over
from pagedserve.gateway.grpc_service import prompt_from_proto
from pagedserve.tokenizer.core import ChatMessage
from pagedserve.v1 import gateway_pb2, tokenizer_pb2

DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_load_json_text() -> None:
    assert load_json_text(nested(MAX_DEPTH), "x") is not None
    assert load_json_text('{"a": [1, 2]}', "x") == {"a": [1, 2]}
    for text in (nested(MAX_DEPTH + 1), DEEP):
        with pytest.raises(
            InvalidArgument, match=f"x nests arrays or objects more than {MAX_DEPTH} levels"
        ) as err:
            load_json_text(text, "x")
        assert err.value.field == "x"
    with pytest.raises(InvalidArgument, match="x is not valid JSON"):
        load_json_text("{", "x")
    assert text_nests_over(DEEP, 64) and not text_nests_over("{", 64) and not text_nests_over("[1]", 1)
    assert depth_over([[1]], 1) and not depth_over([[1]], 2) and not depth_over(list(range(10**5)), 1)


def test_deep_json_schemas_are_refused_before_the_grammar_is_built() -> None:
    """800 levels of `properties` took about a minute in the grammar library, blocking the gateway."""
    level = '{"type":"object","properties":{"a":'
    deep_schema = level * 800 + '{"type":"integer"}' + "}}" * 800
    for spec in (deep_schema, '{"type":"array","items":' + nested(20_000) + "}"):
        with pytest.raises(
            InvalidArgument, match="response_format.json_schema nests arrays or objects"
        ) as err:
            structured.validate("json_schema", spec, "response_format")
        assert err.value.field == "response_format"
    shallow = level * 10 + '{"type":"integer"}' + "}}" * 10
    structured.validate("json_schema", shallow, "response_format")
    with pytest.raises(InvalidArgument, match="invalid JSON schema"):  # not JSON: the library's own words
        structured.validate("json_schema", "{", "response_format")


def test_http_schema_text_and_grpc_json_fields() -> None:
    from pagedserve.gateway.openai_request import parse_chat

    body = {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": DEEP}},
    }
    with pytest.raises(InvalidArgument, match="nests arrays or objects more than"):
        parse_chat(body)
    chat = tokenizer_pb2.ChatMessages(
        messages=[tokenizer_pb2.ChatMessage(role="user", content="x")],
        chat_template_kwargs_json='{"a": ' + DEEP + "}",
    )
    with pytest.raises(InvalidArgument, match="chat.chat_template_kwargs_json nests") as err:
        prompt_from_proto(gateway_pb2.GenerateRequest(chat=chat))
    assert err.value.field == "chat.chat_template_kwargs_json"


def test_tool_calls_in_messages() -> None:
    deep_call = ChatMessage("assistant", "", tool_calls_json=DEEP)
    with pytest.raises(InvalidArgument, match="chat.messages.tool_calls_json nests"):
        deep_call.to_template()
    with pytest.raises(InvalidArgument, match="tool_calls_json must be a JSON list"):
        ChatMessage("assistant", "", tool_calls_json='{"id": 1}').to_template()
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": DEEP}}
    message = ChatMessage("assistant", "", tool_calls_json=json.dumps([call])).to_template()
    assert message["tool_calls"][0]["function"]["arguments"] == DEEP  # too deep to decode: kept as text
    call["function"]["arguments"] = '{"zone": "UTC"}'
    message = ChatMessage("assistant", "", tool_calls_json=json.dumps([call])).to_template()
    assert message["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}
