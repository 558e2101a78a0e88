"""Tool calling in chat: `tools` and `tool_choice` in, `message.tool_calls` out.

- `tools` (OpenAI's list of `{"type": "function", "function": {name, description, parameters}}`)
  go to the chat template as `tools`; a template that does not use them is a 400 naming `tools`.
- `tool_choice` "none": the model answers in text. "auto" (the default with tools): the model
  may call tools in the format Hermes/Qwen templates teach, one
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` per call; the gateway finds those in
  the output. "required", or a named function: the output is constrained (structured output)
  to a JSON array of `{"name", "arguments"}` calls of the given tools, or to the named
  function's arguments object, so it always parses.

Found calls become `tool_calls` (id, type "function", function.name, function.arguments as a
JSON string) with finish_reason "tool_calls"; text outside the calls stays the content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from pagedserve.common.errors import InvalidArgument

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(slots=True)
class ToolChoice:
    """How a chat request may use its tools; `function` is set for a named choice."""

    mode: str  # "none" | "auto" | "required" | "function"
    function: str = ""
    names: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parse_tools(body: dict) -> tuple[str, ToolChoice | None, dict | None]:
    """(tools as JSON text for the template, the choice, the JSON schema to constrain the output to
    or None). ("", None, None) without tools."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise InvalidArgument("tool_choice needs tools", field="tool_choice")
        return "", None, None
    if not isinstance(tools, list):
        raise InvalidArgument("tools must be a list of function tools", field="tools")
    parameters: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(function, dict)
        ):
            raise InvalidArgument(
                f"tools[{i}] must be {{type: function, function: {{name, ...}}}}", field="tools"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"tools[{i}].function.name must be a non-empty string", field="tools")
        params = function.get("parameters", _EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise InvalidArgument(
                f"tools[{i}].function.parameters must be a JSON Schema object", field="tools"
            )
        if not isinstance(params.get("$defs", {}), dict):
            raise InvalidArgument(
                f"tools[{i}].function.parameters.$defs must be an object of named schemas", field="tools"
            )
        parameters[name] = params
    tools_json = json.dumps(tools)  # ASCII: a lone surrogate stays an escape, refused by the tokenizer
    names = list(parameters)
    if choice is None or choice in ("auto", "none"):
        return tools_json, ToolChoice(choice or "auto", names=names), None
    if choice == "required":
        parallel = body.get("parallel_tool_calls", True) is not False
        return tools_json, ToolChoice("required", names=names), _calls_schema(parameters, parallel)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidArgument(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            field="tool_choice",
        )
    if name not in parameters:
        raise InvalidArgument(f"tool_choice names {name!r}, which is not in tools", field="tool_choice")
    return tools_json, ToolChoice("function", function=name, names=names), parameters[name]


def _calls_schema(parameters: dict[str, dict], parallel: bool) -> dict:
    """A JSON array of one or more calls, each `{"name": <a tool>, "arguments": <its parameters>}`.

    Each tool's `$defs` move to the root, where its `#/$defs/...` references point once the
    parameters sit inside the array."""
    one_call, defs = [], {}
    for name, params in parameters.items():
        defs.update(params.get("$defs", {}))
        params = {k: v for k, v in params.items() if k != "$defs"}
        one_call.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": one_call}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def extract_tool_calls(choice: ToolChoice, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) from a finished choice's text. No calls found: (text, [])."""
    if choice.mode == "function":
        try:
            json.loads(text)
        except ValueError:
            return text, []  # cut short (max_tokens): no complete call to report
        return None, [ToolCall(choice.function, text)]
    if choice.mode == "required":
        try:
            calls = json.loads(text)
        except ValueError:
            return text, []
        return None, [
            ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False))
            for c in calls
            if isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c
        ]
    if choice.mode != "auto":
        return text, []
    calls: list[ToolCall] = []
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(call, dict) or call.get("name") not in choice.names:
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        text_args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(call["name"], text_args))
    if not calls:
        return text, []
    content = _CALL.sub("", text).strip()
    return content or None, calls
