"""The SDK's request side: keyword arguments to a checked `GenerateRequest`.

A value protobuf cannot carry (an int past its field's width, a float past float32's range or
not finite, text with a lone surrogate) raises `InvalidArgument` naming the field, here in the
client, before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from pagedserve.common import errors, structured
from pagedserve.common.chat_template import check_template_kwargs, template_kwargs_to_json
from pagedserve.common.params import SamplingParams, early_stopping_to_proto
from pagedserve.gateway import constraints
from pagedserve.gateway.body_fields import INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN, check_float
from pagedserve.v1 import gateway_pb2, tokenizer_pb2

INT32 = (INT32_MIN, INT32_MAX)
INT64 = (INT64_MIN, INT64_MAX)
_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
_INT32_FIELDS = {"max_tokens", "top_k", "n", "logprobs", "min_tokens", "prompt_logprobs"}


def _int(name: str, value: Any, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidArgument(f"{name} must be an integer, got {value!r}", field=name)
    if not bounds[0] <= value <= bounds[1]:
        bits = 32 if bounds == INT32 else 64
        shown = value if value.bit_length() <= 256 else f"an integer of {value.bit_length()} bits"
        raise errors.InvalidArgument(
            f"{name} must be in [{bounds[0]}, {bounds[1]}] (a {bits}-bit integer), got {shown}", field=name
        )
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise errors.InvalidArgument(f"{name} must be true or false, got {value!r}", field=name)
    return value


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"{name} must be a string, got {type(value).__name__}", field=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise errors.InvalidArgument(
            f"{name} is not valid Unicode: a lone surrogate \\u{ord(value[err.start]):04x} at character {err.start}",
            field=name,
        ) from None
    return value


def sampling_to_proto(sampling: dict[str, Any]) -> gateway_pb2.GenerateSamplingParams:
    """Only the given fields (None means not given), each checked against its protobuf type."""
    unknown = sorted(set(sampling) - _SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling argument: {', '.join(unknown)}")
    msg = gateway_pb2.GenerateSamplingParams()
    for name, value in sampling.items():
        if value is None:
            continue
        if name in _INT32_FIELDS:
            setattr(msg, name, _int(name, value, INT32))
        elif name == "seed":
            msg.seed = _int(name, value, INT64)
        elif name in ("stop_token_ids", "allowed_token_ids"):
            getattr(msg, name).extend(_int(name, t, INT32) for t in value)
        elif name == "bad_words":
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise errors.InvalidArgument("bad_words must be a list of strings", field=name)
            msg.bad_words.extend(_text(f"{name}[{i}]", w) for i, w in enumerate(value))
        elif name == "bad_words_token_ids":
            if not isinstance(value, list | tuple) or not all(isinstance(ids, list | tuple) for ids in value):
                raise errors.InvalidArgument(
                    "bad_words_token_ids must be a list of lists of token ids", field=name
                )
            for ids in value:
                msg.bad_words_token_ids.add(ids=[_int(name, t, INT32) for t in ids])
        elif name == "logit_bias":
            if not isinstance(value, dict):
                raise errors.InvalidArgument("logit_bias must be a dict of {token id: bias}", field=name)
            for token, bias in value.items():
                if isinstance(token, str) and token.lstrip("-").isdecimal():  # OpenAI's JSON form
                    token = int(token)
                msg.logit_bias[_int(name, token, INT32)] = check_float(name, bias)
        elif name in ("ignore_eos", "use_beam_search"):
            setattr(msg, name, _bool(name, value))
        elif name == "early_stopping":
            if value not in (True, False, "never") or not isinstance(value, bool | str):
                raise errors.InvalidArgument(
                    f'early_stopping must be True, False or "never", got {value!r}', field=name
                )
            msg.early_stopping = early_stopping_to_proto(value)
        else:
            setattr(msg, name, check_float(name, value))
    return msg


def _constraint(outputs: dict[str, Any] | None, fmt: dict[str, Any] | None) -> tuple[str, str]:
    if outputs is not None and fmt is not None:
        raise errors.InvalidArgument(
            "pass structured_outputs or response_format, not both", field="structured_outputs"
        )
    if outputs is not None:
        return constraints.structured_outputs(outputs)
    if fmt is not None:
        return constraints.response_format(fmt)
    return "", ""


def build_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[dict[str, str]] | None = None,
    model: str = "",
    stop: str | Sequence[str] | None = None,
    request_id: str = "",
    add_special_tokens: bool | None = None,
    skip_special_tokens: bool | None = None,
    add_generation_prompt: bool | None = None,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    priority: int = 0,
    detokenize: bool | None = None,
    include_stop_str_in_output: bool = False,
    truncate_prompt_tokens: int | None = None,
    structured_outputs: dict[str, Any] | None = None,
    response_format: dict[str, Any] | None = None,
    **sampling: Any,
) -> gateway_pb2.GenerateRequest:
    """A `GenerateRequest` from exactly one of `prompt`, `token_ids` or `messages`.

    The output may be constrained as over HTTP: `structured_outputs` in vLLM's form (exactly one
    of `json` (a schema), `regex`, `choice` (a list of strings), `grammar` (EBNF), `json_object`)
    or `response_format` in OpenAI's (`{"type": "json_schema", "json_schema": {"schema": ...}}`
    or `{"type": "json_object"}`); the gateway refuses a bad one with INVALID_ARGUMENT.

    Raises `InvalidArgument` (naming the field) for a value protobuf cannot carry."""
    given = [x is not None for x in (prompt, token_ids, messages)]
    if sum(given) != 1:
        raise TypeError("pass exactly one of prompt, token_ids= or messages=")
    if messages is None:
        _no_chat_options(add_generation_prompt, continue_final_message, chat_template_kwargs)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    msg = gateway_pb2.GenerateRequest(
        model=_text("model", model),
        sampling=sampling_to_proto(sampling),
        stop=[_text("stop", s) for s in stops],
        request_id=_text("request_id", request_id),
        priority=_int("priority", priority, INT32),
    )
    if prompt is not None:
        msg.text = _text("prompt", prompt)
    elif token_ids is not None:
        msg.token_ids.SetInParent()  # set even when empty, so the gateway says "empty", not "missing"
        msg.token_ids.ids.extend(_int("token_ids", t, INT32) for t in token_ids)
    else:
        msg.chat.CopyFrom(
            _chat(messages or [], add_generation_prompt, continue_final_message, chat_template_kwargs)
        )
    kind, spec = _constraint(structured_outputs, response_format)
    if kind:
        msg.sampling.structured.CopyFrom(structured.to_proto(kind, spec))
    if add_special_tokens is not None:
        msg.add_special_tokens = add_special_tokens
    if skip_special_tokens is not None:
        msg.skip_special_tokens = skip_special_tokens
    if detokenize is not None:  # False: token ids only, the gateway does no detokenizing
        msg.detokenize = detokenize
    msg.include_stop_str_in_output = _bool("include_stop_str_in_output", include_stop_str_in_output)
    if truncate_prompt_tokens is not None:
        msg.truncate_prompt_tokens = _int("truncate_prompt_tokens", truncate_prompt_tokens, INT32)
    return msg


def _no_chat_options(add_generation_prompt, continue_final_message, chat_template_kwargs) -> None:
    """The chat template's options go with messages= only (the gateway would not see them)."""
    for name, value, unset in (
        ("add_generation_prompt", add_generation_prompt, None),
        ("continue_final_message", continue_final_message, False),
        ("chat_template_kwargs", chat_template_kwargs, None),
    ):
        if value is not unset:
            raise errors.InvalidArgument(f"{name} goes with messages=, not a text prompt", field=name)


def _message(message: Any, position: int) -> tokenizer_pb2.ChatMessage:
    """One chat message: a dict with a role and (as over HTTP) a content that may be left out."""
    if not isinstance(message, dict) or "role" not in message:
        raise errors.InvalidArgument(
            f"messages[{position}] must be a dict with a role and a content", field="messages.role"
        )
    content = message.get("content")
    return tokenizer_pb2.ChatMessage(
        role=_text("messages.role", message["role"]),
        content="" if content is None else _text("messages.content", content),
    )


def _chat(
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool | None,
    continue_final_message: bool,
    template_kwargs: dict[str, Any] | None,
) -> tokenizer_pb2.ChatMessages:
    """A chat with its template options; `add_generation_prompt` None leaves it to the gateway (true,
    or false with `continue_final_message`); `template_kwargs` are checked here as the gateway will."""
    chat = tokenizer_pb2.ChatMessages(
        messages=[_message(m, i) for i, m in enumerate(messages)],
        continue_final_message=_bool("continue_final_message", continue_final_message),
    )
    if add_generation_prompt is not None:
        chat.add_generation_prompt = _bool("add_generation_prompt", add_generation_prompt)
    if template_kwargs is not None:
        kwargs = check_template_kwargs(template_kwargs)
        try:
            chat.chat_template_kwargs_json = template_kwargs_to_json(kwargs)
        except (TypeError, ValueError) as err:  # a value JSON cannot hold: a set, bytes, an object
            raise errors.InvalidArgument(
                f"chat_template_kwargs must hold JSON values: {err}", field="chat_template_kwargs"
            ) from None
    return chat


def build_tokenize_request(
    prompt: str | None = None,
    *,
    messages: Sequence[dict[str, str]] | None = None,
    model: str = "",
    add_special_tokens: bool | None = None,
    add_generation_prompt: bool | None = None,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    return_token_strs: bool = False,
) -> gateway_pb2.TokenizePromptRequest:
    """A `TokenizePromptRequest` from exactly one of `prompt` or `messages`."""
    if (prompt is None) == (messages is None):
        raise TypeError("pass exactly one of prompt or messages=")
    if messages is None:
        _no_chat_options(add_generation_prompt, continue_final_message, chat_template_kwargs)
    msg = gateway_pb2.TokenizePromptRequest(model=_text("model", model), return_token_strs=return_token_strs)
    if prompt is not None:
        msg.text = _text("prompt", prompt)
    else:
        msg.chat.CopyFrom(
            _chat(messages or [], add_generation_prompt, continue_final_message, chat_template_kwargs)
        )
    if add_special_tokens is not None:
        msg.add_special_tokens = add_special_tokens
    return msg


def build_detokenize_request(
    token_ids: Sequence[int], *, model: str = "", skip_special_tokens: bool = False
) -> gateway_pb2.DetokenizeIdsRequest:
    return gateway_pb2.DetokenizeIdsRequest(
        model=_text("model", model),
        token_ids=[_int("token_ids", t, INT32) for t in token_ids],
        skip_special_tokens=skip_special_tokens,
    )
