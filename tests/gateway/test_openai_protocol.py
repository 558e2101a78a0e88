"""OpenAI bodies to SamplingParams and back: fields, defaults, errors that name the field."""

from __future__ import annotations

import pytest

from pagedserve.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from pagedserve.gateway.datatypes import (
    ChoiceDelta,
    CompletedRequest,
    FinishReason,
    PayloadTooLarge,
    PromptKind,
    ReadTimeout,
    RequestOutput,
    TokenLogprob,
    TopLogprob,
    Unauthenticated,
    UnsupportedMediaType,
    Usage,
)
from pagedserve.gateway.openai_request import parse_chat, parse_completion
from pagedserve.gateway.openai_response import ChunkFormatter, error_body, full_response


def test_completion_defaults() -> None:
    call = parse_completion({"prompt": "def f():"})
    req = call.request
    assert req.prompt.kind is PromptKind.TEXT and req.prompt.text == "def f():"
    assert req.model == "" and req.stop == [] and not call.stream and not call.chat
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.n, s.seed, s.logprobs) == (16, 1.0, 1.0, 1, None, None)
    assert not req.max_tokens_to_fill


def test_completion_all_fields_and_vllm_extras() -> None:
    call = parse_completion(
        {
            "model": "tiny-py",
            "prompt": [1, 2, 3],
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "n": 3,
            "stop": "\n\n",
            "seed": 42,
            "logprobs": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "ignore_eos": True,
            "stop_token_ids": [9],
            "min_tokens": 2,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "user": "ignored",
        }
    )
    req, s = call.request, call.request.sampling
    assert req.prompt.kind is PromptKind.TOKEN_IDS and req.prompt.token_ids == [1, 2, 3]
    assert req.model == "tiny-py" and req.stop == ["\n\n"] and req.logprob_token_strings
    assert call.stream and call.include_usage
    assert (s.max_tokens, s.temperature, s.top_p, s.n, s.seed, s.logprobs) == (7, 0.0, 0.5, 3, 42, 2)
    assert (s.top_k, s.min_p, s.repetition_penalty, s.ignore_eos, s.stop_token_ids, s.min_tokens) == (
        5,
        0.1,
        1.2,
        True,
        [9],
        2,
    )
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -0.5)


def test_completion_prompt_in_a_one_element_list() -> None:
    assert parse_completion({"prompt": ["hi"]}).request.prompt.text == "hi"
    assert parse_completion({"prompt": [[4, 5]]}).request.prompt.token_ids == [4, 5]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": 3}, "prompt"),
        ({"prompt": ["a", 3]}, "prompt"),
        ({"prompt": [["a"]]}, "prompt"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stop": ["a", ""]}, "stop"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "echo": True, "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": "x", "echo": 1}, "echo"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {
                "prompt": "x",
                "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": 1},
            },
            "continuous_usage_stats",
        ),
        ({"prompt": "x", "stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"prompt": "x", "model": 3}, "model"),
    ],
)
def test_completion_bad_fields_are_named(body: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_completion(body)
    assert info.value.field == field
    assert field in info.value.message


def test_a_list_of_prompts_is_a_batch_with_one_request_each() -> None:
    call = parse_completion({"prompt": ["a", [4, 5], "c"], "n": 2, "stop": "x", "logprobs": 0})
    assert [r.prompt.kind for r in call.requests] == [PromptKind.TEXT, PromptKind.TOKEN_IDS, PromptKind.TEXT]
    assert [r.prompt.text for r in call.requests] == ["a", "", "c"] and call.requests[1].prompt.token_ids == [
        4,
        5,
    ]
    assert call.num_choices == 6 and call.request is call.requests[0]
    assert all(r.stop == ["x"] and r.sampling.n == 2 and r.logprob_token_strings for r in call.requests)
    assert call.requests[0].sampling is not call.requests[1].sampling, "each request owns its sampling"


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"prompt": "x", "n": 2**40}, "n", "n must be <= 128 (the gateway's --max-n), got 1099511627776"),
        ({"prompt": "x", "n": 10**30}, "n", "got 1000000000000000000000000000000"),
        ({"prompt": "x", "n": 2**300}, "n", "got an integer of 301 bits"),
        ({"prompt": "x", "seed": 2**64}, "seed", "seed must be <= 9223372036854775807"),
        ({"prompt": "x", "seed": 2**63 - 1}, None, ""),
        ({"prompt": "x", "priority": 2**31}, "priority", "priority must be <= 2147483647"),
        ({"prompt": "x", "priority": -(2**31) - 1}, "priority", "priority must be >= -2147483648"),
        ({"prompt": "x", "min_tokens": 2**31}, "min_tokens", "min_tokens must be <= 2147483647"),
        (
            {"prompt": "\ud800"},
            "prompt",
            "prompt is not valid Unicode: a lone surrogate \\ud800 at character 0",
        ),
        ({"prompt": "x", "stop": ["a"] * 65}, "stop", "stop has 65 strings, more than the limit of 64"),
        ({"prompt": "x", "stop": ["a" * 4097]}, "stop", "stop strings are 4097 characters in all"),
        ({"prompt": "x", "temperature": float("inf")}, "temperature", "temperature must be a finite number"),
        ({"prompt": "x", "min_p": float("nan")}, "min_p", "min_p must be a finite number"),
        ({"prompt": ["x"] * 129}, "prompt", "prompt is a batch of 129 prompts, more than the limit of 128"),
        ({"prompt": ["x"] * 5, "n": 26}, "prompt", "5 prompts x n=26 = 130 choices"),
    ],
)
def test_sizes_and_ranges_are_checked_while_parsing(body: dict, field: str | None, message: str) -> None:
    if field is None:
        parse_completion(body)
        return
    with pytest.raises(InvalidArgument) as info:
        parse_completion(body)
    assert info.value.field == field and message in info.value.message


def test_limits_come_from_the_config() -> None:
    from pagedserve.gateway.config import RequestLimits

    limits = RequestLimits(max_n=4, max_stop_strings=2, max_stop_chars=5)
    with pytest.raises(InvalidArgument, match=r"n must be <= 4 \(the gateway's --max-n\), got 5"):
        parse_chat({"messages": [{"role": "user", "content": "x"}], "n": 5}, limits)
    with pytest.raises(InvalidArgument, match="stop has 3 strings, more than the limit of 2"):
        parse_completion({"prompt": "x", "stop": ["a", "b", "c"]}, limits)
    with pytest.raises(
        InvalidArgument, match="stop strings are 6 characters in all, more than the limit of 5"
    ):
        parse_completion({"prompt": "x", "stop": ["abc", "def"]}, limits)
    with pytest.raises(InvalidArgument, match="messages\\[1\\].role is not valid Unicode"):
        parse_chat(
            {"messages": [{"role": "user", "content": "x"}, {"role": "\udc00", "content": "y"}]}, limits
        )


def test_range_checks_are_left_to_sampling_params_validate() -> None:
    # Parsing takes any number; SamplingParams.validate (in the engine) names the limit.
    call = parse_completion({"prompt": "x", "temperature": -1, "max_tokens": 0, "top_p": 2, "n": 0})
    with pytest.raises(InvalidArgument) as info:
        call.request.sampling.validate()
    assert info.value.field == "max_tokens" and "max_tokens must be >= 1" in info.value.message


def test_chat_parsing() -> None:
    call = parse_chat(
        {
            "messages": [
                {"role": "system", "content": "You write Python."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Square "}, {"type": "text", "text": "x"}],
                },
                {"role": "assistant", "content": None},
            ],
            "logprobs": True,
            "top_logprobs": 3,
        }
    )
    req = call.request
    assert call.chat and req.prompt.kind is PromptKind.CHAT and req.prompt.add_generation_prompt
    assert [(m.role, m.content) for m in req.prompt.messages] == [
        ("system", "You write Python."),
        ("user", "Square x"),
        ("assistant", ""),
    ]
    assert req.max_tokens_to_fill, "chat without max_tokens fills the context"
    assert req.sampling.logprobs == 3


def test_chat_max_tokens_forms() -> None:
    assert (
        parse_chat(
            {"messages": [{"role": "user", "content": "a"}], "max_tokens": 5}
        ).request.sampling.max_tokens
        == 5
    )
    call = parse_chat(
        {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 6, "max_tokens": 5}
    )
    assert call.request.sampling.max_tokens == 6 and not call.request.max_tokens_to_fill
    assert (
        parse_chat(
            {"messages": [{"role": "user", "content": "a"}], "logprobs": True}
        ).request.sampling.logprobs
        == 0
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 21}, "prompt_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 0, "stream": True},
            "prompt_logprobs",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_chat_bad_fields_are_named(body: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_chat(body)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("err", "status", "kind", "code"),
    [
        (
            InvalidArgument("top_p must be in (0, 1], got 2.0", field="top_p"),
            400,
            "invalid_request_error",
            "invalid_argument",
        ),
        (NotFound("model 'x' is not served here", field="model"), 404, "not_found_error", "model_not_found"),
        (ResourceExhausted("queue full"), 429, "rate_limit_error", "resource_exhausted"),
        (Unauthenticated("invalid API key"), 401, "authentication_error", "invalid_api_key"),
        (PayloadTooLarge("too big"), 413, "invalid_request_error", "request_too_large"),
        (UnsupportedMediaType("not JSON"), 415, "invalid_request_error", "unsupported_media_type"),
        (ReadTimeout("stalled"), 408, "invalid_request_error", "request_timeout"),
        (Unavailable("scheduler at h:1 is unavailable"), 503, "service_unavailable_error", "unavailable"),
    ],
)
def test_error_body_is_openai_shaped(err, status: int, kind: str, code: str) -> None:
    got_status, body = error_body(err)
    assert got_status == status
    assert body == {"error": {"message": err.message, "type": kind, "param": err.field, "code": code}}


def _logprob(token_id: int, token: str) -> TokenLogprob:
    return TokenLogprob(
        token_id, -0.5, top=[TopLogprob(token_id, -0.5, token), TopLogprob(7, -1.5, "z")], token=token
    )


def test_full_completion_response() -> None:
    call = parse_completion({"prompt": "x", "n": 2, "logprobs": 1})
    result = CompletedRequest.start("cmpl-1", 2)
    result.add(
        RequestOutput(
            "cmpl-1",
            [
                ChoiceDelta(0, "ab", [1, 2], [_logprob(1, "a"), _logprob(2, "b")], FinishReason.LENGTH),
                ChoiceDelta(1, "", [3], [_logprob(3, "")], FinishReason.STOP),
            ],
            usage=Usage(4, 3, 2),
        )
    )
    body = full_response(call, result, "cmpl-1", 123, "tiny-py")
    assert body["object"] == "text_completion" and body["model"] == "tiny-py" and body["created"] == 123
    assert [c["text"] for c in body["choices"]] == ["ab", ""]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"a": -0.5, "z": -1.5}, {"b": -0.5, "z": -1.5}],
        "text_offset": [0, 1],
    }
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 2},
    }


def test_chat_stream_chunks() -> None:
    call = parse_chat(
        {
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    fmt = ChunkFormatter(call, "chatcmpl-1", 5, "tiny-py")
    (start,) = fmt.start()
    assert start["object"] == "chat.completion.chunk" and start["usage"] is None
    assert start["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert fmt.deltas([ChoiceDelta(0, "", [5])]) == [], "held-back text makes no chunk"
    (mid,) = fmt.deltas([ChoiceDelta(0, "hi", [6])])
    assert mid["choices"][0]["delta"] == {"content": "hi"} and mid["choices"][0]["finish_reason"] is None
    (last,) = fmt.deltas([ChoiceDelta(0, "", [], finish_reason=FinishReason.STOP)])
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    (usage,) = fmt.usage(Usage(3, 2, 0))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5


def test_completion_stream_without_usage_option_sends_no_usage_chunk() -> None:
    call = parse_completion({"prompt": "x", "stream": True})
    fmt = ChunkFormatter(call, "cmpl-1", 5, "m")
    assert fmt.start() == [] and fmt.usage(Usage(1, 1, 0)) == []
    (chunk,) = fmt.deltas([ChoiceDelta(0, "a", [1], finish_reason=FinishReason.LENGTH)])
    assert "usage" not in chunk
    assert chunk["choices"] == [{"index": 0, "text": "a", "logprobs": None, "finish_reason": "length"}]
