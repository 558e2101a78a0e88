"""OpenAI-compatible request bodies (/v1/completions, /v1/chat/completions) to `GenerationRequest`.

Parsing is strict about types and ranges (a bad field is a 400 naming it, in OpenAI's error
shape) and lenient about fields it does not use (`user`, `metadata`, ...). Besides OpenAI's
fields it takes vLLM's sampling extras: top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, min_tokens, skip_special_tokens, add_special_tokens, priority,
return_token_ids (choices carry `token_ids`, and `prompt_token_ids` on the first),
return_tokens_as_token_ids (logprobs name tokens "token_id:<id>"),
include_stop_str_in_output, truncate_prompt_tokens (the prompt's last k tokens; -1: max_model_len),
allowed_token_ids
and prompt_logprobs (not with stream, as in vLLM); chat bodies also chat_template_kwargs and
continue_final_message (`chat_messages.py`). The sampling fields are read in `sampling_body.py`. Completions' `echo` with `logprobs` gets the
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
from collections.abc import Mapping
from dataclasses import dataclass, replace

from pagedserve.common import structured
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import MAX_LOGPROBS, SamplingParams
from pagedserve.gateway.body_fields import (
    MISSING,
    check_object,
    check_text,
    get_field,
    is_int_list,
    read_bool,
    read_int,
    read_model,
    reject,
)
from pagedserve.gateway.chat_messages import read_chat_prompt
from pagedserve.gateway.config import RequestLimits
from pagedserve.gateway.constraints import parse_constraint
from pagedserve.gateway.datatypes import GenerationRequest, Prompt, PromptKind
from pagedserve.gateway.sampling_body import read_sampling
from pagedserve.gateway.tool_calls import ToolChoice, parse_tools

COMPLETIONS_MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions


@dataclass(slots=True)
class ApiCall:
    """A parsed /v1/completions or /v1/chat/completions body.

    A completions body with a list of prompts holds one request per prompt (same sampling);
    prompt i's choice j is choice i * n + j of the answer, as OpenAI numbers them."""

    requests: list[GenerationRequest]
    chat: bool
    stream: bool = False
    include_usage: bool = False
    # stream_options.continuous_usage_stats (vLLM's): the running usage in every chunk too
    continuous_usage: bool = False
    return_token_ids: bool = False  # vLLM's extra: token ids in every choice (and the prompt's)
    # vLLM's return_tokens_as_token_ids: logprobs name each token "token_id:<id>", not its text
    tokens_as_ids: bool = False
    echo: bool = False  # completions: each choice's text starts with its prompt
    # completions with echo and logprobs: the prompt's tokens lead each choice's logprobs
    echo_logprobs: bool = False
    # vLLM's extra: each choice (chat: the response) carries `prompt_logprobs` with this many tops
    prompt_logprobs: int | None = None
    tool_choice: ToolChoice | None = None  # chat with tools: how to read tool calls from the output
    reasoning: str | None = None  # chat: the gateway's --reasoning-parser, set after parsing

    @property
    def request(self) -> GenerationRequest:
        """The first (usually the only) request; its sampling is every request's."""
        return self.requests[0]

    def reasoning_for(self, parser: str | None) -> str | None:
        """The gateway's reasoning parser for this call: chat only, and not when the answer is
        constrained (structured output, a named or required tool), which cannot hold a thought."""
        return parser if self.chat and not self.request.sampling.constrained else None

    @property
    def num_choices(self) -> int:
        return len(self.requests) * self.request.sampling.n


def _stop(body: dict, limits: RequestLimits) -> list[str]:
    value = get_field(body, "stop")
    if value is MISSING:
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


def _check_beam_search(sampling: SamplingParams, stream: bool) -> None:
    """What beam search cannot go with at this layer (the rest: `SamplingParams.validate`)."""
    if stream and sampling.use_beam_search:
        raise InvalidArgument(
            "stream is not supported with use_beam_search: beams come all at once", field="stream"
        )


def _top_count(body: dict, name: str) -> int | None:
    """A logprobs count: None when absent, else in [0, MAX_LOGPROBS] (the 400 names the field)."""
    value = read_int(body, name, None)
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise InvalidArgument(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}", field=name)
    return value


def _prompt_logprobs(body: dict, stream: bool) -> int | None:
    """vLLM's `prompt_logprobs`; like vLLM, only for whole (non-streamed) answers."""
    value = _top_count(body, "prompt_logprobs")
    if value is not None and stream:
        raise InvalidArgument("prompt_logprobs is not available when stream is true", field="prompt_logprobs")
    return value


def _stream_options(body: dict, stream: bool) -> dict[str, bool]:
    """ApiCall's include_usage and continuous_usage. Like vLLM, continuous_usage_stats counts only
    together with include_usage."""
    options = get_field(body, "stream_options")
    if options is MISSING:
        return {}
    if not isinstance(options, dict):
        raise InvalidArgument("stream_options must be an object", field="stream_options")
    if not stream:
        raise InvalidArgument("stream_options is only allowed when stream is true", field="stream_options")
    include = read_bool(options, "include_usage", False)
    continuous = read_bool(options, "continuous_usage_stats", False)
    return {"include_usage": include, "continuous_usage": include and continuous}


def _common_checks(body: dict) -> None:
    check_object(body)
    read_model(body)


# ---- bodies ----


def parse_completion(
    body: dict, limits: RequestLimits | None = None, *, defaults: Mapping[str, float] | None = None
) -> ApiCall:
    """A /v1/completions body: prompt is a string or a list of token ids, or a list of either
    (a batch: one request per prompt, each with n choices)."""
    limits = limits or RequestLimits()
    _common_checks(body)
    reject(body, "suffix", lambda v: not v, "suffix")
    prompts = _completion_prompts(body, limits)
    logprobs = _top_count(body, "logprobs")
    echo = read_bool(body, "echo", False)
    stream = read_bool(body, "stream", False)
    prompt_logprobs = _prompt_logprobs(body, stream)
    kind, spec, _ = parse_constraint(body)
    sampling = read_sampling(
        body,
        read_int(body, "max_tokens", COMPLETIONS_MAX_TOKENS_DEFAULT),
        logprobs,
        limits,
        (kind, spec),
        defaults,
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
    best_of = read_int(body, "best_of", None)
    if best_of is not None and best_of != sampling.n:
        raise InvalidArgument("best_of is not supported (only best_of == n)", field="best_of")
    _check_beam_search(sampling, stream)
    common = _request_fields(body, limits)
    if echo and common["truncate_prompt_tokens"] is not None:
        raise InvalidArgument(
            "truncate_prompt_tokens cannot be combined with echo (which prompt would it echo?)",
            field="truncate_prompt_tokens",
        )
    tokens_as_ids = read_bool(body, "return_tokens_as_token_ids", False)
    token_strings = (logprobs is not None and not tokens_as_ids) or prompt_logprobs is not None
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
        **_stream_options(body, stream),
        return_token_ids=read_bool(body, "return_token_ids", False),
        tokens_as_ids=tokens_as_ids,
        echo=echo,
        echo_logprobs=echo and logprobs is not None,
        prompt_logprobs=prompt_logprobs,
    )


def _completion_prompts(body: dict, limits: RequestLimits) -> list[Prompt]:
    value = body.get("prompt")
    if isinstance(value, str) or is_int_list(value) and value:
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
    add_special_tokens = read_bool(body, "add_special_tokens", True)
    prompts = []
    for i, item in enumerate(value):
        where = "prompt" if len(value) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            text = check_text(item, where, "prompt")
            prompts.append(Prompt(PromptKind.TEXT, text=text, add_special_tokens=add_special_tokens))
        elif is_int_list(item):
            prompts.append(Prompt(PromptKind.TOKEN_IDS, token_ids=item))
        else:
            raise InvalidArgument(
                "prompt must be a string, a list of token ids, or a list of either", field="prompt"
            )
    return prompts


def _copy(sampling: SamplingParams) -> SamplingParams:
    return replace(sampling, stop_token_ids=list(sampling.stop_token_ids))


def parse_chat(
    body: dict, limits: RequestLimits | None = None, *, defaults: Mapping[str, float] | None = None
) -> ApiCall:
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
    prompt = read_chat_prompt(body, tools_json)
    max_tokens = read_int(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = read_int(body, "max_tokens", None)
    want_logprobs = read_bool(body, "logprobs", False)
    tokens_as_ids = read_bool(body, "return_tokens_as_token_ids", False)
    top_logprobs = read_int(body, "top_logprobs", None)
    if top_logprobs is not None:
        if not want_logprobs:
            raise InvalidArgument("top_logprobs needs logprobs set to true", field="top_logprobs")
        if not 0 <= top_logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(
                f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top_logprobs}", field="top_logprobs"
            )
    logprobs = (top_logprobs or 0) if want_logprobs else None
    stream = read_bool(body, "stream", False)
    prompt_logprobs = _prompt_logprobs(body, stream)
    # Without max_tokens the engine fills it in once the prompt's length is known.
    sampling = read_sampling(
        body, 1 if max_tokens is None else max_tokens, logprobs, limits, (kind, spec), defaults
    )
    sampling.prompt_logprobs = prompt_logprobs
    request = GenerationRequest(
        prompt=prompt,
        sampling=sampling,
        logprob_token_strings=(want_logprobs and not tokens_as_ids) or prompt_logprobs is not None,
        **_request_fields(body, limits),
    )
    request.max_tokens_to_fill = max_tokens is None
    _check_beam_search(sampling, stream)
    return ApiCall(
        requests=[request],
        chat=True,
        stream=stream,
        **_stream_options(body, stream),
        return_token_ids=read_bool(body, "return_token_ids", False),
        tokens_as_ids=tokens_as_ids,
        prompt_logprobs=prompt_logprobs,
        tool_choice=tool_choice,
    )


def _request_fields(body: dict, limits: RequestLimits) -> dict:
    """The GenerationRequest fields besides prompt and sampling."""
    return {
        "model": read_model(body),
        "stop": _stop(body, limits),
        "skip_special_tokens": read_bool(body, "skip_special_tokens", True),
        "priority": read_int(body, "priority", 0),
        "include_stop_str_in_output": read_bool(body, "include_stop_str_in_output", False),
        "truncate_prompt_tokens": read_int(body, "truncate_prompt_tokens", None),
    }
