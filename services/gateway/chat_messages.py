"""The `messages` of a /v1/chat/completions (or /tokenize) body, checked, as `ChatMessage`s, and
the chat `Prompt` they make with the body's template options.

Content is a string or a list of text parts (joined); an assistant message may carry
`tool_calls`, a tool message `tool_call_id` and `name`. Each error names the message's index.
The template options are vLLM's: `add_generation_prompt`, `continue_final_message` and
`chat_template_kwargs` (see `common.chat_template`).
"""

from __future__ import annotations

import json

from pagedserve.common.chat_template import check_template_kwargs, generation_prompt, template_kwargs_to_json
from pagedserve.common.errors import InvalidArgument
from pagedserve.gateway.body_fields import MISSING, check_text, get_field, read_bool
from pagedserve.gateway.datatypes import ChatMessage, Prompt, PromptKind


def read_chat_prompt(body: dict, tools_json: str) -> Prompt:
    """The body's chat, with its template options, as a `Prompt`."""
    continue_final = read_bool(body, "continue_final_message", False)
    kwargs = get_field(body, "chat_template_kwargs")
    return Prompt(
        PromptKind.CHAT,
        messages=read_messages(body),
        add_generation_prompt=generation_prompt(
            read_bool(body, "add_generation_prompt", None), continue_final
        ),
        tools_json=tools_json,
        continue_final_message=continue_final,
        template_kwargs_json=""
        if kwargs is MISSING
        else template_kwargs_to_json(check_template_kwargs(kwargs)),
    )


def read_messages(body: dict) -> list[ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidArgument("messages must be a list of {role, content} objects", field="messages")
    return [_chat_message(m, i) for i, m in enumerate(messages)]


def _chat_message(message, position: int) -> ChatMessage:
    where = f"messages[{position}]"
    if not isinstance(message, dict):
        raise InvalidArgument(f"{where} must be an object with role and content", field="messages")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidArgument(f"{where}.role must be a non-empty string", field="messages")
    check_text(role, f"{where}.role", "messages")
    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidArgument(f"{where}.content: only text parts are supported", field="messages")
            parts.append(part["text"])
        content = "".join(parts)
    elif not isinstance(content, str):
        raise InvalidArgument(f"{where}.content must be a string or a list of text parts", field="messages")
    return ChatMessage(
        role=role,
        content=check_text(content, f"{where}.content", "messages"),
        tool_calls_json=_tool_calls_json(message.get("tool_calls"), where),
        tool_call_id=_optional_text(message, "tool_call_id", where),
        name=_optional_text(message, "name", where),
    )


def _optional_text(message: dict, key: str, where: str) -> str:
    value = message.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}.{key} must be a string", field="messages")
    return check_text(value, f"{where}.{key}", "messages")


def _tool_calls_json(calls, where: str) -> str:
    """An assistant message's `tool_calls`, checked, as JSON text (ASCII: no lone surrogate survives)."""
    if calls is None or calls == []:
        return ""
    if not isinstance(calls, list):
        raise InvalidArgument(f"{where}.tool_calls must be a list", field="messages")
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidArgument(
                f"{where}.tool_calls[{i}] must be {{id, type: function, function: {{name, arguments}}}}",
                field="messages",
            )
    return json.dumps(calls)
