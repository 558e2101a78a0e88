"""Tools in chat templates: handed to a template that renders them, refused by one that does not."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from pagedserve.common.errors import InvalidArgument
from pagedserve.tokenizer.core import ChatMessage, ServedTokenizer

TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
    "{% for m in messages %}{{ m.role }}:"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}call {{ c.function.name }} {{ c.function.arguments.zone }}"
    "{% endfor %}{% elif m.role == 'tool' %}result for {{ m.tool_call_id }}: {{ m.content }}"
    "{% else %}{{ m.content }}{% endif %}|{% endfor %}"
)


@pytest.fixture
def bundled(bundled_model_path: str) -> ServedTokenizer:
    return ServedTokenizer.load(bundled_model_path)


def test_bundled_template_has_no_tools(bundled: ServedTokenizer) -> None:
    assert bundled.has_chat_template and not bundled.chat_template_supports_tools
    with pytest.raises(InvalidArgument) as info:
        bundled.render_chat([ChatMessage("user", "hi")], tools=[TOOL])
    assert info.value.field == "tools"


def test_tools_calls_and_results_reach_the_template(bundled_model_path: str) -> None:
    hf = AutoTokenizer.from_pretrained(bundled_model_path)
    hf.chat_template = TEMPLATE
    tok = ServedTokenizer.wrap(hf, model="with-tools")
    assert tok.chat_template_supports_tools
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "utc"}'}}
    ]
    messages = [
        ChatMessage("user", "time?"),
        ChatMessage("assistant", "", tool_calls_json=json.dumps(calls)),
        ChatMessage("tool", "12:00", tool_call_id="c1", name="get_time"),
    ]
    rendered = tok.render_chat(messages, add_generation_prompt=False, tools=[TOOL])
    # The arguments string is decoded for the template, which indexes into it.
    assert rendered == "TOOLS:get_time;|user:time?|assistant:call get_time utc|tool:result for c1: 12:00|"
    assert tok.render_chat(messages[:1], add_generation_prompt=False) == "user:time?|"
