"""OpenAI-compatible request bodies (/v1/completions, /v1/chat/completions) to `GenerationRequest`.

Parsing is strict about types and ranges (a bad field is a 400 naming it, in OpenAI's error
shape) and lenient about fields it does not use (`user`, `metadata`, ...). Besides OpenAI's
fields it takes vLLM's sampling extras: top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, min_tokens, skip_special_tokens, add_special_tokens, priority,
return_token_ids (choices carry `token_ids`, and `prompt_token_ids` on the first) and
prompt_logprobs (not with stream, as in vLLM). Completions' `echo` with `logprobs` gets the
prompt tokens' logprobs too: both forms set `SamplingParams.prompt_logprobs`. Beam search as
vLLM's `use_beam_search` (n is the beam width; temperature defaults to 0 with it) with
transformers' `length_penalty` and `early_stopping` (true, false or "never"). Beam search
answers all at once: `stream: true` with it is refused.

Every size a body asks for (n, prompts in a batch, stop strings) is checked against
`RequestLimits` here, before anything is built for it; every integer must fit its protobuf
field (int32, or int64 for `seed`), every float be finite, every text be valid Unicode (no
lone surrogates), so that nothing fails later with a 500.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from pagedserve.common import structured
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import MAX_LOGPROBS, SamplingParams
from pagedserve.gateway.config import RequestLimits
from pagedserve.gateway.constraints import parse_constraint
from pagedserve.gateway.datatypes import ChatMessage, GenerationRequest, Prompt, PromptKind
from pagedserve.gateway.tool_calls import ToolChoice, parse_tools

COMPLETIONS_MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
_MISSING = object()


@dataclass(slots=True)
class ApiCall:
    """A parsed /v1/completions or /v1/chat/completions body.

    A completions body with a list of prompts holds one request per prompt (same sampling);
    prompt i's choice j is choice i * n + j of the answer, as OpenAI numbers them."""

    requests: list[GenerationRequest]
    chat: bool
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False  # vLLM's extra: token ids in every choice (and the prompt's)
    echo: bool = False  # completions: each choice's text starts with its prompt
    # completions with echo and logprobs: the prompt's tokens lead each choice's logprobs
    echo_logprobs: bool = False
    # vLLM's extra: each choice (chat: the response) carries `prompt_logprobs` with this many tops
    prompt_logprobs: int | None = None
    tool_choice: ToolChoice | None = None  # chat with tools: how to read tool calls from the output

    @property
    def request(self) -> GenerationRequest:
        """The first (usually the only) request; its sampling is every request's."""
        return self.requests[0]

    @property
    def num_choices(self) -> int:
        return len(self.requests) * self.request.sampling.n


# ---- field readers: each names the field in its error ----


def _show(value) -> str:
    """A value for an error message: short, and never a huge integer's (slow, limited) digits."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _get(body: dict, name: str):
    value = body.get(name, _MISSING)
    return _MISSING if value is None else value


def _int(body: dict, name: str, default, *, lo: int = INT32_MIN, hi: int = INT32_MAX, limit: str = ""):
    """An integer field in [lo, hi]; `limit` names where `hi` comes from (e.g. a flag)."""
    value = _get(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {_show(value)}", field=name)
    if value > hi:
        raise InvalidArgument(f"{name} must be <= {hi}{limit}, got {_show(value)}", field=name)
    if value < lo:
        raise InvalidArgument(f"{name} must be >= {lo}, got {_show(value)}", field=name)
    return value


def _float(body: dict, name: str, default):
    value = _get(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number, got {_show(value)}", field=name)
    if isinstance(value, int) and value.bit_length() > 128 or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {_show(value)}", field=name)
    if abs(value) > FLOAT32_MAX:
        raise InvalidArgument(
            f"{name} must be at most {FLOAT32_MAX:.4g} in size, got {value:.4g}", field=name
        )
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = _get(body, name)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {_show(value)}", field=name)
    return value


def check_text(text: str, where: str, field: str) -> str:
    """`text` unchanged, or InvalidArgument when it cannot be UTF-8 (a lone surrogate, "\\ud800")."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidArgument(
                f"{where} is not valid Unicode: a lone surrogate \\u{ord(text[err.start]):04x} "
                f"at character {err.start}",
                field=field,
            ) from None
    return text


def _stop(body: dict, limits: RequestLimits) -> list[str]:
    value = _get(body, "stop")
    if value is _MISSING:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InvalidArgument("stop must be a string or a list of strings", field="stop")
    if len(value) > limits.max_stop_strings:
        raise InvalidArgument(
            f"stop has {len(value)} strings, more than the limit of {limits.max_stop_strings}", field="stop"
        )
    if not all(isinstance(s, str) for s in value):
        raise InvalidArgument("stop must be a string or a list of strings", field="stop")
    if any(s == "" for s in value):
        raise InvalidArgument("stop strings must not be empty", field="stop")
    total = sum(len(s) for s in value)
    if total > limits.max_stop_chars:
        raise InvalidArgument(
            f"stop strings are {total} characters in all, more than the limit of {limits.max_stop_chars}",
            field="stop",
        )
    for i, s in enumerate(value):
        check_text(s, f"stop[{i}]", "stop")
    return value


def _int_list(body: dict, name: str) -> list[int]:
    value = _get(body, name)
    if value is _MISSING:
        return []
    if not _is_int_list(value):
        raise InvalidArgument(f"{name} must be a list of integers", field=name)
    return value


def _is_int_list(value) -> bool:
    # json.loads makes exact ints (true is a bool, not an int); map/set run at C speed.
    return isinstance(value, list) and set(map(type, value)) <= {int}


def _reject(body: dict, name: str, ok, why: str) -> None:
    value = _get(body, name)
    if value is not _MISSING and not ok(value):
        raise InvalidArgument(f"{name} is not supported: {why}", field=name)


def _early_stopping(body: dict) -> bool | str:
    value = _get(body, "early_stopping")
    if value is _MISSING:
        return False
    if value not in (True, False, "never") or isinstance(value, int | float) and not isinstance(value, bool):
        raise InvalidArgument(
            f'early_stopping must be true, false or "never", got {_show(value)}', field="early_stopping"
        )
    return value


def _check_beam_search(sampling: SamplingParams, stream: bool) -> None:
    """What beam search cannot go with at this layer (the rest: `SamplingParams.validate`)."""
    if stream and sampling.use_beam_search:
        raise InvalidArgument(
            "stream is not supported with use_beam_search: beams come all at once", field="stream"
        )


def _sampling(
    body: dict,
    max_tokens: int,
    logprobs: int | None,
    limits: RequestLimits,
    constraint: tuple[str, str] = ("", ""),
) -> SamplingParams:
    beam = _bool(body, "use_beam_search", False)
    n_limit = (limits.max_beam_width, " with use_beam_search (the gateway's --max-beam-width)")
    n_hi, n_why = n_limit if beam else (limits.max_n, " (the gateway's --max-n)")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 0.0 if beam else 1.0),
        top_p=_float(body, "top_p", 1.0),
        top_k=_int(body, "top_k", 0),
        min_p=_float(body, "min_p", 0.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0),
        presence_penalty=_float(body, "presence_penalty", 0.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0),
        seed=_int(body, "seed", None, lo=INT64_MIN, hi=INT64_MAX),
        n=_int(body, "n", 1, hi=n_hi, limit=n_why),
        stop_token_ids=_int_list(body, "stop_token_ids"),
        ignore_eos=_bool(body, "ignore_eos", False),
        logprobs=logprobs,
        min_tokens=_int(body, "min_tokens", 0),
        structured_kind=constraint[0],
        structured_spec=constraint[1],
        use_beam_search=beam,
        length_penalty=_float(body, "length_penalty", 1.0),
        early_stopping=_early_stopping(body),
    )


def _top_count(body: dict, name: str) -> int | None:
    """A logprobs count: None when absent, else in [0, MAX_LOGPROBS] (the 400 names the field)."""
    value = _int(body, name, None)
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise InvalidArgument(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}", field=name)
    return value


def _prompt_logprobs(body: dict, stream: bool) -> int | None:
    """vLLM's `prompt_logprobs`; like vLLM, only for whole (non-streamed) answers."""
    value = _top_count(body, "prompt_logprobs")
    if value is not None and stream:
        raise InvalidArgument("prompt_logprobs is not available when stream is true", field="prompt_logprobs")
    return value


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
    if model is not _MISSING:
        if not isinstance(model, str):
            raise InvalidArgument("model must be a string", field="model")
        check_text(model, "model", "model")
    _reject(body, "logit_bias", lambda v: not v, "logit_bias")
    _reject(body, "include_stop_str_in_output", lambda v: v is False, "stop strings are never returned")


# ---- bodies ----


def parse_completion(body: dict, limits: RequestLimits | None = None) -> ApiCall:
    """A /v1/completions body: prompt is a string or a list of token ids, or a list of either
    (a batch: one request per prompt, each with n choices)."""
    limits = limits or RequestLimits()
    _common_checks(body)
    _reject(body, "suffix", lambda v: not v, "suffix")
    prompts = _completion_prompts(body, limits)
    logprobs = _top_count(body, "logprobs")
    echo = _bool(body, "echo", False)
    stream = _bool(body, "stream", False)
    prompt_logprobs = _prompt_logprobs(body, stream)
    kind, spec, _ = parse_constraint(body)
    sampling = _sampling(
        body, _int(body, "max_tokens", COMPLETIONS_MAX_TOKENS_DEFAULT), logprobs, limits, (kind, spec)
    )
    # The executor computes the prompt's logprobs once, with the most tops either form wants.
    asked = [k for k in (prompt_logprobs, logprobs if echo else None) if k is not None]
    sampling.prompt_logprobs = max(asked) if asked else None
    if len(prompts) * sampling.n > limits.max_n:
        raise InvalidArgument(
            f"{len(prompts)} prompts x n={sampling.n} = {len(prompts) * sampling.n} choices, more than "
            f"the limit of {limits.max_n} (the gateway's --max-n)",
            field="prompt",
        )
    best_of = _int(body, "best_of", None)
    if best_of is not None and best_of != sampling.n:
        raise InvalidArgument("best_of is not supported (only best_of == n)", field="best_of")
    _check_beam_search(sampling, stream)
    common = _request_fields(body, limits)
    token_strings = logprobs is not None or prompt_logprobs is not None
    return ApiCall(
        # Each request has its own SamplingParams: the engine may adjust one (max_tokens to fill).
        requests=[
            GenerationRequest(
                prompt=p, sampling=_copy(sampling), logprob_token_strings=token_strings, **common
            )
            for p in prompts
        ],
        chat=False,
        stream=stream,
        include_usage=_stream_options(body, stream),
        return_token_ids=_bool(body, "return_token_ids", False),
        echo=echo,
        echo_logprobs=echo and logprobs is not None,
        prompt_logprobs=prompt_logprobs,
    )


def _completion_prompts(body: dict, limits: RequestLimits) -> list[Prompt]:
    value = body.get("prompt")
    if isinstance(value, str) or _is_int_list(value) and value:
        value = [value]
    elif value == []:
        value = [[]]  # an empty id list: "prompt must not be empty", from the engine
    if not isinstance(value, list) or not value:
        raise InvalidArgument(
            "prompt must be a string, a list of token ids, or a list of either", field="prompt"
        )
    if len(value) > limits.max_n:
        raise InvalidArgument(
            f"prompt is a batch of {len(value)} prompts, more than the limit of {limits.max_n} "
            "(the gateway's --max-n)",
            field="prompt",
        )
    add_special_tokens = _bool(body, "add_special_tokens", True)
    prompts = []
    for i, item in enumerate(value):
        where = "prompt" if len(value) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            text = check_text(item, where, "prompt")
            prompts.append(Prompt(PromptKind.TEXT, text=text, add_special_tokens=add_special_tokens))
        elif _is_int_list(item):
            prompts.append(Prompt(PromptKind.TOKEN_IDS, token_ids=item))
        else:
            raise InvalidArgument(
                "prompt must be a string, a list of token ids, or a list of either", field="prompt"
            )
    return prompts


def _copy(sampling: SamplingParams) -> SamplingParams:
    return replace(sampling, stop_token_ids=list(sampling.stop_token_ids))


def parse_chat(body: dict, limits: RequestLimits | None = None) -> ApiCall:
    """A /v1/chat/completions body. Without max_tokens the answer may fill the context."""
    limits = limits or RequestLimits()
    _common_checks(body)
    kind, spec, _ = parse_constraint(body)
    tools_json, tool_choice, tool_schema = parse_tools(body)
    if tool_schema is not None:
        if kind:
            raise InvalidArgument(
                f"tool_choice {body.get('tool_choice')!r} constrains the output itself: it cannot be "
                "combined with response_format or structured_outputs",
                field="tool_choice",
            )
        kind, spec = "json_schema", json.dumps(tool_schema, separators=(",", ":"))
        structured.validate(kind, spec, "tools")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidArgument("messages must be a list of {role, content} objects", field="messages")
    prompt = Prompt(
        PromptKind.CHAT,
        messages=[_chat_message(m, i) for i, m in enumerate(messages)],
        add_generation_prompt=_bool(body, "add_generation_prompt", True),
        tools_json=tools_json,
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
    stream = _bool(body, "stream", False)
    prompt_logprobs = _prompt_logprobs(body, stream)
    # Without max_tokens the engine fills it in once the prompt's length is known.
    sampling = _sampling(body, 1 if max_tokens is None else max_tokens, logprobs, limits, (kind, spec))
    sampling.prompt_logprobs = prompt_logprobs
    request = GenerationRequest(
        prompt=prompt,
        sampling=sampling,
        logprob_token_strings=want_logprobs or prompt_logprobs is not None,
        **_request_fields(body, limits),
    )
    request.max_tokens_to_fill = max_tokens is None
    _check_beam_search(sampling, stream)
    return ApiCall(
        requests=[request],
        chat=True,
        stream=stream,
        include_usage=_stream_options(body, stream),
        return_token_ids=_bool(body, "return_token_ids", False),
        prompt_logprobs=prompt_logprobs,
        tool_choice=tool_choice,
    )


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


def _request_fields(body: dict, limits: RequestLimits) -> dict:
    """The GenerationRequest fields besides prompt and sampling."""
    model = _get(body, "model")
    return {
        "model": "" if model is _MISSING else model,
        "stop": _stop(body, limits),
        "skip_special_tokens": _bool(body, "skip_special_tokens", True),
        "priority": _int(body, "priority", 0),
    }
