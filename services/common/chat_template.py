"""What a chat request may pass to the chat template besides its messages and tools, checked the
same way in the gateway (HTTP and gRPC) and the tokenizer service.

- `chat_template_kwargs`: extra variables for the template, e.g. `{"enable_thinking": false}` for
  templates that read one. Each key must be a plain identifier and must not be one of
  `apply_chat_template`'s own parameters or a variable the renderer sets itself: a key like
  `chat_template` would otherwise swap the server's template for the caller's text. Values are
  any JSON; the whole object travels as JSON text and counts toward the tokenizer's input limit.
- `continue_final_message`: render the last message open, so the model continues it (e.g. an
  assistant turn the client has begun) instead of starting a new turn. It cannot go with
  `add_generation_prompt`, which then defaults to false.
"""

from __future__ import annotations

import json
import os
import re

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.json_text import MAX_DEPTH, depth_over, load_json_text, too_deep

# apply_chat_template's parameters (a kwarg with one of these names would set it instead of
# reaching the template), and the names it and the renderer pass on or to every template themselves.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "self",
        "conversation",
        "conversations",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "raise_exception",
        "strftime_now",
    }
)
MAX_TEMPLATE_KWARGS = 64  # keys in one request's chat_template_kwargs
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


# What a message costs against the tokenizer's input byte limit besides its text: the template's
# framing of it (role markers and separators), so that half a million empty messages in an 8 MB
# body are refused by their count before they are rendered (or even sent to the tokenizer).
MESSAGE_OVERHEAD_BYTES = 16


def chat_bytes(messages) -> int:
    """A conversation's size against the tokenizer's input byte limit: every field of every
    message (a gateway `ChatMessage` or a `pagedserve.v1.ChatMessage`) plus its overhead."""
    return sum(
        len(m.content.encode("utf-8", errors="replace"))
        + len(m.role.encode("utf-8", errors="replace"))
        + len(m.tool_calls_json)
        + len(m.tool_call_id.encode("utf-8", errors="replace"))
        + len(m.name.encode("utf-8", errors="replace"))
        + MESSAGE_OVERHEAD_BYTES
        for m in messages
    )


def check_template_kwargs(value: object, field: str = "chat_template_kwargs") -> dict:
    """`value` as the template's extra variables, or InvalidArgument naming `field`."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be an object of template variables", field=field)
    if depth_over(value, MAX_DEPTH):
        raise too_deep(field, MAX_DEPTH)
    if len(value) > MAX_TEMPLATE_KWARGS:
        raise InvalidArgument(
            f"{field} has {len(value)} keys, more than the limit of {MAX_TEMPLATE_KWARGS}", field=field
        )
    for key in value:
        if not isinstance(key, str) or not _IDENTIFIER.match(key):
            raise InvalidArgument(
                f"{field} key {key!r:.70} is not a template variable name (letters, digits and _, "
                "at most 64, not starting with a digit)",
                field=field,
            )
        if key in RESERVED_TEMPLATE_KWARGS:
            raise InvalidArgument(
                f"{field} may not set {key!r}: it is set by the server or by its own request field",
                field=field,
            )
    return value


def template_kwargs_from_json(text: str, field: str = "chat.chat_template_kwargs_json") -> dict:
    """`ChatMessages.chat_template_kwargs_json` read and checked; empty text: no variables."""
    if not text:
        return {}
    return check_template_kwargs(load_json_text(text, field), field)


def template_kwargs_to_json(kwargs: dict) -> str:
    return json.dumps(kwargs, separators=(",", ":")) if kwargs else ""


def generation_prompt(add_generation_prompt: bool | None, continue_final_message: bool) -> bool:
    """`add_generation_prompt` as given, or by default true unless the final message is continued;
    both true is InvalidArgument."""
    if add_generation_prompt is None:
        return not continue_final_message
    if add_generation_prompt and continue_final_message:
        raise InvalidArgument(
            "continue_final_message continues the last message, so add_generation_prompt must be "
            "false with it",
            field="continue_final_message",
        )
    return add_generation_prompt


def chat_template_is_file(value: str) -> bool:
    """What `--chat-template value` names: a file (True), or the template's text (False), which
    must hold Jinja tags; anything else is a ValueError. (os.path.isfile, not Path.is_file: the
    latter raises for a name of 256+ bytes, which a template's text usually is.)"""
    if os.path.isfile(value):
        return True
    if "{{" in value or "{%" in value:
        return False
    raise ValueError(f"--chat-template {value!r:.80} is neither a file nor a Jinja template")


def chat_generation_prompt(chat) -> bool:
    """A `ChatMessages` proto's add_generation_prompt (an `optional bool`: unset means true, so
    a chat is answered, unless its final message is to be continued)."""
    given = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else None
    return generation_prompt(given, chat.continue_final_message)
