"""Structured-output and tool fields of the OpenAI bodies: parsing, refusal naming the field, and
tool calls read back from the output."""

from __future__ import annotations

import json

import pytest

from pagedserve.common import structured
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.outputs import FinishReason
from pagedserve.common.params import SamplingParams
from pagedserve.gateway.datatypes import ChoiceDelta
from pagedserve.gateway.openai_request import parse_chat, parse_completion
from pagedserve.gateway.openai_response import ChunkFormatter, chat_message
from pagedserve.gateway.tool_calls import ToolChoice, extract_tool_calls

MESSAGES = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}


def _chat(**body):
    return parse_chat({"messages": MESSAGES, **body})


def test_response_format_and_structured_outputs_set_the_constraint() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}
    sampling = _chat(response_format=fmt).request.sampling
    assert sampling.structured_kind == "json_schema" and json.loads(sampling.structured_spec) == SCHEMA
    assert _chat(response_format={"type": "json_object"}).request.sampling.structured_kind == "json_object"
    assert not _chat(response_format={"type": "text"}).request.sampling.constrained
    for given, kind in [
        ({"json": SCHEMA}, "json_schema"),
        ({"json": json.dumps(SCHEMA)}, "json_schema"),
        ({"regex": "[0-9]+"}, "regex"),
        ({"choice": ["a", "b"]}, "choice"),
        ({"grammar": 'root ::= "a"'}, "grammar"),
        ({"json_object": True}, "json_object"),
    ]:
        call = parse_completion({"prompt": "x", "structured_outputs": given})
        assert call.request.sampling.structured_kind == kind
    guided = parse_completion({"prompt": "x", "guided_choice": ["a", "b"]}).request.sampling
    assert (guided.structured_kind, json.loads(guided.structured_spec)) == ("choice", ["a", "b"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "what"}}}},
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"guided_regex": "(x"}, "guided_regex"),
        (
            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
            "structured_outputs",
        ),
        ({"structured_outputs": {"regex": "a"}, "ignore_eos": True}, "ignore_eos"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        (
            {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
        ({"tools": "f"}, "tools"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "messages"),
    ],
)
def test_bad_fields_are_named(body: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        call = parse_chat({"messages": MESSAGES, **body})
        call.request.sampling.validate()
    assert info.value.field == field, info.value.message


def test_tool_choice_constrains_named_and_required() -> None:
    named = _chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}})
    assert (
        named.tool_choice.mode == "function" and json.loads(named.request.sampling.structured_spec) == SCHEMA
    )
    assert json.loads(named.request.prompt.tools_json) == [TOOL]
    required = _chat(tools=[TOOL], tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(required.request.sampling.structured_spec)
    assert schema["type"] == "array" and schema["maxItems"] == 1
    structured.validate("json_schema", required.request.sampling.structured_spec, "tools")
    # A tool whose parameters refer to their own $defs still compiles inside the array of calls.
    with_refs = {
        "type": "function",
        "function": {
            "name": "g",
            "parameters": {
                "type": "object",
                "properties": {"p": {"$ref": "#/$defs/point"}},
                "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}}},
            },
        },
    }
    _chat(tools=[TOOL, with_refs], tool_choice="required")
    auto = _chat(tools=[TOOL])
    assert auto.tool_choice.mode == "auto" and not auto.request.sampling.constrained
    history = _chat(
        messages=[
            *MESSAGES,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]
    )
    assistant, tool = history.request.prompt.messages[1:]
    assert json.loads(assistant.tool_calls_json)[0]["function"]["name"] == "f"
    assert tool.tool_call_id == "c1" and tool.content == "42"


def test_extract_tool_calls() -> None:
    choice = ToolChoice("auto", names=["f", "g"])
    text = 'Let me look. <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n<tool_call>{"name": "g"}</tool_call>'
    content, calls = extract_tool_calls(choice, text)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert extract_tool_calls(choice, "plain answer") == ("plain answer", [])
    assert extract_tool_calls(choice, '<tool_call>{"name": "unknown"}</tool_call>')[1] == []
    content, calls = extract_tool_calls(ToolChoice("function", function="f"), '{"a": 2}')
    assert content is None and calls[0].name == "f" and calls[0].arguments == '{"a": 2}'
    assert extract_tool_calls(ToolChoice("function", function="f"), '{"a": ')[1] == []  # cut by max_tokens
    _, calls = extract_tool_calls(ToolChoice("required"), '[{"name": "f", "arguments": {"a": 3}}]')
    assert calls[0].name == "f" and json.loads(calls[0].arguments) == {"a": 3}


def test_chat_message_finish_reasons() -> None:
    named = ToolChoice("function", function="f")
    message, finish = chat_message(named, '{"a": 1}', FinishReason.STOP)
    assert finish == "tool_calls" and message["tool_calls"][0]["function"]["name"] == "f"
    assert message["content"] is None
    assert chat_message(named, '{"a"', FinishReason.LENGTH) == (
        {"role": "assistant", "content": '{"a"'},
        "length",
    )
    assert chat_message(None, "hi", FinishReason.STOP) == ({"role": "assistant", "content": "hi"}, "stop")


def test_stream_holds_tool_text_until_the_end() -> None:
    call = _chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}})
    formatter = ChunkFormatter(call, "id", 0, "m")
    assert formatter.deltas([ChoiceDelta(0, '{"a": ')]) == []
    (chunk,) = formatter.deltas([ChoiceDelta(0, "5}", finish_reason=FinishReason.STOP)])
    (choice,) = chunk["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (tool_call,) = choice["delta"]["tool_calls"]
    assert tool_call["index"] == 0 and tool_call["function"] == {"name": "f", "arguments": '{"a": 5}'}


def test_sampling_params_carry_the_constraint_over_proto_and_records() -> None:
    from dataclasses import asdict

    for kind, spec in [("json_schema", json.dumps(SCHEMA)), ("choice", '["a", "b"]'), ("json_object", "")]:
        params = SamplingParams(structured_kind=kind, structured_spec=spec)
        assert SamplingParams.from_proto(params.to_proto()) == params
        assert SamplingParams(**asdict(params)) == params  # the scheduler's Redis record
    assert not SamplingParams.from_proto(SamplingParams().to_proto()).constrained
