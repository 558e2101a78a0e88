"""OpenAI-compatible request bodies (/v1/completions, /v1/chat/completions) to `GenerationRequest`.

Parsing is strict about types and ranges (a bad field is a 400 naming it, in OpenAI's error
shape) and lenient about fields it does not use (`user`, `metadata`, ...). Besides OpenAI's
fields it takes vLLM's sampling extras: top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, min_tokens, skip_special_tokens, add_special_tokens, priority, and
return_token_ids (choices carry `token_ids`, and `prompt_token_ids` on the first).
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import MAX_LOGPROBS, SamplingParams
from pagedserve.gateway.datatypes import ChatMessage, GenerationRequest, Prompt, PromptKind

COMPLETIONS_MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions
_MISSING = object()


@dataclass(slots=True)
class ApiCall:
    """A parsed /v1/completions or /v1/chat/completions body."""

    request: GenerationRequest
    chat: bool
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False  # vLLM's extra: token ids in every choice (and the prompt's)


# ---- field readers: each names the field in its error ----


def _get(body: dict, name: str):
    value = body.get(name, _MISSING)
    return _MISSING if value is None else value


def _int(body: dict, name: str, default):
    value = _get(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {value!r}", field=name)
    return value


def _float(body: dict, name: str, default):
    value = _get(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number, got {value!r}", field=name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = _get(body, name)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {value!r}", field=name)
    return value


def _stop(body: dict) -> list[str]:
    value = _get(body, "stop")
    if value is _MISSING:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidArgument("stop must be a string or a list of strings", field="stop")
    if any(s == "" for s in value):
        raise InvalidArgument("stop strings must not be empty", field="stop")
    return value


def _int_list(body: dict, name: str) -> list[int]:
    value = _get(body, name)
    if value is _MISSING:
        return []
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidArgument(f"{name} must be a list of integers", field=name)
    return value


def _reject(body: dict, name: str, ok, why: str) -> None:
    value = _get(body, name)
    if value is not _MISSING and not ok(value):
        raise InvalidArgument(f"{name} is not supported: {why}", field=name)


def _sampling(body: dict, max_tokens: int, logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0),
        top_p=_float(body, "top_p", 1.0),
        top_k=_int(body, "top_k", 0),
        min_p=_float(body, "min_p", 0.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0),
        presence_penalty=_float(body, "presence_penalty", 0.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0),
        seed=_int(body, "seed", None),
        n=_int(body, "n", 1),
        stop_token_ids=_int_list(body, "stop_token_ids"),
        ignore_eos=_bool(body, "ignore_eos", False),
        logprobs=logprobs,
        min_tokens=_int(body, "min_tokens", 0),
    )


def _stream_options(body: dict, stream: bool) -> bool:
    options = _get(body, "stream_options")
    if options is _MISSING:
        return False
    if not isinstance(options, dict):
        raise InvalidArgument("stream_options must be an object", field="stream_options")
    if not stream:
        raise InvalidArgument("stream_options is only allowed when stream is true", field="stream_options")
    return _bool(options, "include_usage", False)


def _common_checks(body: dict) -> None:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    model = _get(body, "model")
    if model is not _MISSING and not isinstance(model, str):
        raise InvalidArgument("model must be a string", field="model")
    _reject(body, "logit_bias", lambda v: not v, "logit_bias")
    _reject(body, "include_stop_str_in_output", lambda v: v is False, "stop strings are never returned")


# ---- bodies ----


def parse_completion(body: dict) -> ApiCall:
    """A /v1/completions body: prompt is a string or a list of token ids (or one of either in a list)."""
    _common_checks(body)
    _reject(body, "echo", lambda v: v is False, "echo")
    _reject(body, "suffix", lambda v: not v, "suffix")
    prompt_value = body.get("prompt")
    if isinstance(prompt_value, list) and len(prompt_value) == 1 and isinstance(prompt_value[0], str | list):
        prompt_value = prompt_value[0]
    if isinstance(prompt_value, str):
        prompt = Prompt(
            PromptKind.TEXT, text=prompt_value, add_special_tokens=_bool(body, "add_special_tokens", True)
        )
    elif isinstance(prompt_value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt_value
    ):
        prompt = Prompt(PromptKind.TOKEN_IDS, token_ids=prompt_value)
    elif (
        isinstance(prompt_value, list)
        and all(isinstance(p, str | list) for p in prompt_value)
        and prompt_value
    ):
        raise InvalidArgument(
            "batched prompts are not supported: send one prompt per request", field="prompt"
        )
    else:
        raise InvalidArgument("prompt must be a string or a list of token ids", field="prompt")
    logprobs = _int(body, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidArgument(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", field="logprobs")
    sampling = _sampling(body, _int(body, "max_tokens", COMPLETIONS_MAX_TOKENS_DEFAULT), logprobs)
    best_of = _int(body, "best_of", None)
    if best_of is not None and best_of != sampling.n:
        raise InvalidArgument("best_of is not supported (only best_of == n)", field="best_of")
    stream = _bool(body, "stream", False)
    return ApiCall(
        request=_request(body, prompt, sampling),
        chat=False,
        stream=stream,
        include_usage=_stream_options(body, stream),
        return_token_ids=_bool(body, "return_token_ids", False),
    )


def parse_chat(body: dict) -> ApiCall:
    """A /v1/chat/completions body. Without max_tokens the answer may fill the context."""
    _common_checks(body)
    _reject(body, "tools", lambda v: not v, "tool calls")
    _reject(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text", "only text")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidArgument("messages must be a list of {role, content} objects", field="messages")
    prompt = Prompt(
        PromptKind.CHAT,
        messages=[_chat_message(m, i) for i, m in enumerate(messages)],
        add_generation_prompt=_bool(body, "add_generation_prompt", True),
    )
    max_tokens = _int(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None)
    want_logprobs = _bool(body, "logprobs", False)
    top_logprobs = _int(body, "top_logprobs", None)
    if top_logprobs is not None:
        if not want_logprobs:
            raise InvalidArgument("top_logprobs needs logprobs set to true", field="top_logprobs")
        if not 0 <= top_logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(
                f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top_logprobs}", field="top_logprobs"
            )
    logprobs = (top_logprobs or 0) if want_logprobs else None
    # Without max_tokens the engine fills it in once the prompt's length is known.
    sampling = _sampling(body, 1 if max_tokens is None else max_tokens, logprobs)
    request = _request(body, prompt, sampling)
    request.max_tokens_to_fill = max_tokens is None
    stream = _bool(body, "stream", False)
    return ApiCall(
        request=request,
        chat=True,
        stream=stream,
        include_usage=_stream_options(body, stream),
        return_token_ids=_bool(body, "return_token_ids", False),
    )


def _chat_message(message, position: int) -> ChatMessage:
    where = f"messages[{position}]"
    if not isinstance(message, dict):
        raise InvalidArgument(f"{where} must be an object with role and content", field="messages")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidArgument(f"{where}.role must be a non-empty string", field="messages")
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
    return ChatMessage(role=role, content=content)


def _request(body: dict, prompt: Prompt, sampling: SamplingParams) -> GenerationRequest:
    model = _get(body, "model")
    return GenerationRequest(
        prompt=prompt,
        sampling=sampling,
        model="" if model is _MISSING else model,
        stop=_stop(body),
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        priority=_int(body, "priority", 0),
        logprob_token_strings=sampling.logprobs is not None,
    )
