"""Structured output and tool calling through the whole stack, with the official `openai` client
and the SDK over gRPC.

The stack serves the bundled model from a copy of its folder whose chat template renders `tools`
(the bundled template does not), so the same stack answers every test here. Outputs are greedy
and short: the schemas bound every string and number, so the grammar ends the answer with EOS
well within max_tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from e2e_harness import Stack, running_stack

from pagedserve.client import Client
from pagedserve.common.errors import InvalidArgument

# The bundled template, plus tools (listed in a system turn), assistant tool calls and tool results
# in the <tool_call> / <tool_response> form Hermes-style templates use.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\nYou can call these functions:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|user|>\n<tool_response>{{ message['content'] }}</tool_response><|end|>\n"
    "{% elif message.get('tool_calls') %}<|assistant|>\n{% for call in message['tool_calls'] %}"
    "<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}<|end|>\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "color": {"enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "color", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "local"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def tool_stack(
    bundled_model_path: str, fresh_redis_url, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("tiny-py-tools")
    for item in Path(bundled_model_path).iterdir():
        if item.name != "tokenizer_config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((Path(bundled_model_path) / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with running_stack(str(folder), fresh_redis_url(), tmp_path_factory.mktemp("tool-stack-logs")) as s:
        yield s


@pytest.fixture(scope="module")
def client(tool_stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tool_stack.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, stack: Stack, **kwargs):
    return client.chat.completions.create(
        model=stack.model, messages=ASK, max_tokens=48, temperature=0, **kwargs
    )


def test_chat_json_schema_validates(client: openai.OpenAI, tool_stack: Stack) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = _chat(client, tool_stack, response_format=fmt)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_is_json(client: openai.OpenAI, tool_stack: Stack) -> None:
    # After "kwargs = " the bundled model closes its object at once (greedy): '{"": 9}'.
    reply = client.completions.create(
        model=tool_stack.model,
        prompt="kwargs = ",
        max_tokens=32,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].text), dict)
    # A free object may go on past max_tokens: what there is, is the start of one.
    chat = _chat(client, tool_stack, response_format={"type": "json_object"})
    choice = chat.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith('{"')


def test_structured_outputs_regex_and_choice(client: openai.OpenAI, tool_stack: Stack) -> None:
    regex = _chat(client, tool_stack, extra_body={"structured_outputs": {"regex": "[a-z]{2,5}-[0-9]{3}"}})
    assert regex.choices[0].finish_reason == "stop"
    assert re.fullmatch("[a-z]{2,5}-[0-9]{3}", regex.choices[0].message.content)
    choices = ["yes", "no", "maybe later"]
    picked = _chat(client, tool_stack, extra_body={"structured_outputs": {"choice": choices}})
    assert picked.choices[0].message.content in choices
    grammar = 'root ::= "x=" [0-9] [0-9]? ";"'
    ebnf = _chat(client, tool_stack, extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"x=[0-9]{1,2};", ebnf.choices[0].message.content)


def test_completions_json_schema(client: openai.OpenAI, tool_stack: Stack) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.completions.create(
        model=tool_stack.model,
        prompt="person = ",
        max_tokens=48,
        temperature=0,
        n=2,
        seed=3,
        extra_body={"response_format": fmt},
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), PERSON)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"regex": "([a-z"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": 'root ::= "a" | missing'}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_invalid_constraint_is_400_naming_the_field(tool_stack: Stack, body: dict, field: str) -> None:
    before = tool_stack.stats()
    reply = httpx.post(
        f"{tool_stack.http_url}/v1/chat/completions",
        json={"model": tool_stack.model, "messages": ASK, "max_tokens": 4, **body},
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and field.split(".")[-1] in error["message"], error
    after = tool_stack.stats()
    assert after.blocks_used == before.blocks_used and after.requests_running == 0


def test_tool_without_template_support_is_400(stack: Stack) -> None:
    """The bundled template does not render tools: refused, naming `tools`."""
    reply = httpx.post(
        f"{stack.http_url}/v1/chat/completions",
        json={"model": stack.model, "messages": ASK, "tools": [WEATHER], "max_tokens": 4},
        timeout=30,
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tools", reply.text


def _arguments_valid(call, tools: dict) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(
        json.loads(call.function.arguments), tools[call.function.name]["function"]["parameters"]
    )


def test_tool_choice_named_and_required(client: openai.OpenAI, tool_stack: Stack) -> None:
    tools = {"get_weather": WEATHER, "get_time": TIME}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = client.chat.completions.create(
        model=tool_stack.model,
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=48,
        temperature=0,
    )
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    _arguments_valid(call, tools)

    required = client.chat.completions.create(
        model=tool_stack.model,
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        temperature=0,
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    _arguments_valid(call, tools)

    # The call and its result go back in as history: the template renders both.
    follow_up = client.chat.completions.create(
        model=tool_stack.model,
        messages=[
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ],
        tools=[WEATHER, TIME],
        tool_choice="none",
        max_tokens=6,
        temperature=0,
    )
    assert follow_up.choices[0].message.tool_calls is None
    assert follow_up.usage.prompt_tokens > required.usage.prompt_tokens


def test_tool_choice_named_streams_the_call(client: openai.OpenAI, tool_stack: Stack) -> None:
    stream = client.chat.completions.create(
        model=tool_stack.model,
        messages=[{"role": "user", "content": "Time?"}],
        tools=[TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    calls = [c for chunk in chunks for choice in chunk.choices for c in (choice.delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments)["zone"] in ("utc", "local")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_grpc_structured_outputs(tool_stack: Stack) -> None:
    with Client(tool_stack.grpc_address, timeout=120) as sdk:
        result = sdk.generate(messages=ASK, max_tokens=48, temperature=0, structured_outputs={"json": PERSON})
        assert result.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(result.choices[0].text), PERSON)
        picked = sdk.generate(
            "answer: ", max_tokens=8, temperature=0, structured_outputs={"choice": ["up", "down"]}
        )
        assert picked.choices[0].text in ("up", "down")
        with pytest.raises(InvalidArgument, match="structured"):
            sdk.generate("x", max_tokens=4, structured_outputs={"regex": "(unclosed"})


def test_tool_choice_auto_answers_in_text(client: openai.OpenAI, tool_stack: Stack) -> None:
    """The tiny model writes no <tool_call>: the answer stays text (parsing is unit-tested)."""
    reply = client.chat.completions.create(
        model=tool_stack.model, messages=ASK, tools=[TIME], max_tokens=6, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)
