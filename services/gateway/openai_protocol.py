"""OpenAI-compatible request bodies to `GenerationRequest`, and responses back to JSON.

Parsing is strict about types and ranges (a bad field is a 400 naming it, in OpenAI's error
shape) and lenient about fields it does not use (`user`, `metadata`, ...). Besides OpenAI's
fields it takes vLLM's sampling extras: top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, min_tokens, skip_special_tokens, add_special_tokens, priority, and
return_token_ids (choices carry `token_ids`, and `prompt_token_ids` on the first).
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.common.errors import InvalidArgument, PagedServeError
from pagedserve.common.params import MAX_LOGPROBS, SamplingParams
from pagedserve.gateway.datatypes import (
    ChatMessage,
    ChoiceDelta,
    CompletedRequest,
    FinishReason,
    GenerationRequest,
    Prompt,
    PromptKind,
    TokenLogprob,
    Usage,
)

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


# ---- responses ----


def error_body(err: PagedServeError) -> tuple[int, dict]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}} and its HTTP status."""
    kind = {
        400: "invalid_request_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "service_unavailable_error",
        504: "timeout_error",
    }.get(err.http_status, "internal_error")
    code = "model_not_found" if err.http_status == 404 and err.field == "model" else err.code.lower()
    return err.http_status, {
        "error": {"message": err.message, "type": kind, "param": err.field, "code": code}
    }


def usage_json(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def _token_bytes(token: str | None) -> list[int]:
    return list((token or "").encode())


def chat_logprobs_json(logprobs: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {
                "token": lp.token or "",
                "logprob": lp.logprob,
                "bytes": _token_bytes(lp.token),
                "top_logprobs": [
                    {"token": t.token or "", "logprob": t.logprob, "bytes": _token_bytes(t.token)}
                    for t in lp.top
                ],
            }
            for lp in logprobs
        ]
    }


def completion_logprobs_json(logprobs: list[TokenLogprob], text_offset: int) -> dict:
    """The legacy completions form; `text_offset` is where the first token's text starts."""
    offsets = []
    for lp in logprobs:
        offsets.append(text_offset)
        text_offset += len(lp.token or "")
    return {
        "tokens": [lp.token or "" for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token or "": t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def full_response(
    call: ApiCall, result: CompletedRequest, response_id: str, created: int, model: str
) -> dict:
    """The non-streaming body of either endpoint."""
    choices = []
    want_logprobs = call.request.sampling.logprobs is not None
    for c in result.choices:
        choice: dict = {"index": c.index, "finish_reason": c.finish_reason.openai_name}
        if call.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
            choice["logprobs"] = chat_logprobs_json(c.logprobs) if want_logprobs else None
        else:
            choice["text"] = c.text
            choice["logprobs"] = completion_logprobs_json(c.logprobs, 0) if want_logprobs else None
        if call.return_token_ids:
            choice["token_ids"] = c.token_ids
            choice["prompt_token_ids"] = result.prompt_token_ids
        choices.append(choice)
    return {
        "id": response_id,
        "object": "chat.completion" if call.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_json(result.usage),
    }


class ChunkFormatter:
    """Turns a request's outputs into OpenAI stream chunks (dicts; `sse.sse_event` writes them)."""

    def __init__(self, call: ApiCall, response_id: str, created: int, model: str) -> None:
        self.call = call
        self.response_id = response_id
        self.created = created
        self.model = model
        n = call.request.sampling.n
        self.text_offsets = [0] * n  # completions logprobs: where each choice's next token starts
        self.want_logprobs = call.request.sampling.logprobs is not None

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.call.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.call.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> list[dict]:
        """Chat streams open with the assistant role for every choice."""
        if not self.call.chat:
            return []
        n = self.call.request.sampling.n
        return [
            self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(n)
                ]
            )
        ]

    def deltas(self, deltas: list[ChoiceDelta], prompt_token_ids: list[int] | None = None) -> list[dict]:
        choices = []
        for d in deltas:
            if (
                not d.text
                and d.finish_reason is FinishReason.NONE
                and not d.logprobs
                and not self.call.return_token_ids
            ):
                continue  # nothing a client could see yet (e.g. held-back text)
            choice: dict = {"index": d.index}
            if self.call.chat:
                choice["delta"] = (
                    {"content": d.text} if d.text or d.finish_reason is FinishReason.NONE else {}
                )
                choice["logprobs"] = chat_logprobs_json(d.logprobs) if self.want_logprobs else None
            else:
                choice["text"] = d.text
                if self.want_logprobs:
                    choice["logprobs"] = completion_logprobs_json(d.logprobs, self.text_offsets[d.index])
                    self.text_offsets[d.index] += sum(len(lp.token or "") for lp in d.logprobs)
                else:
                    choice["logprobs"] = None
            choice["finish_reason"] = d.finish_reason.openai_name
            if self.call.return_token_ids:
                choice["token_ids"] = d.token_ids
                if prompt_token_ids is not None:
                    choice["prompt_token_ids"] = prompt_token_ids
            choices.append(choice)
        return [self._chunk(choices)] if choices else []

    def usage(self, usage: Usage) -> list[dict]:
        """The final usage-only chunk, when stream_options.include_usage asked for it."""
        if not self.call.include_usage:
            return []
        chunk = self._chunk([])
        chunk["usage"] = usage_json(usage)
        return [chunk]
