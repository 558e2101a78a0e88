"""Requests whose allowed_token_ids leave nothing to sample are refused before anything is
allocated (400 naming the field, and INVALID_ARGUMENT over gRPC), and a logprob of -inf (an
alternative a mask ruled out) reaches JSON as -9999.0, never as the `-Infinity` JSON lacks.
The sampler's side is in tests/executor/test_sampler_nothing_left.py."""

from __future__ import annotations

import json

import httpx
import pytest
from gateway_fakes import EOS, FakeScheduler
from gateway_harness import assert_error, grpc_gateway, run, serving

from pagedserve.client import AsyncClient
from pagedserve.common.errors import InvalidArgument
from pagedserve.gateway.datatypes import PromptLogprobs, TokenLogprob, TopLogprob
from pagedserve.gateway.openai_logprobs import (
    LOGPROB_FLOOR,
    chat_logprobs_json,
    completion_logprobs_json,
    prompt_logprobs_json,
)


def test_allowed_token_ids_that_leave_nothing_are_400() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            a = ord("a")
            cases = [
                ({"allowed_token_ids": [a], "bad_words": ["a"]}, "bad_words bans every id", "bad_words"),
                (
                    {"allowed_token_ids": [EOS, a], "stop_token_ids": [a], "min_tokens": 1},
                    "min_tokens=1 needs a token that does not end the sequence",
                    "min_tokens",
                ),
            ]
            for extra, words, field in cases:
                for path, prompt in (
                    ("/v1/completions", {"prompt": "x"}),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                ):
                    reply = await http.post(path, json={**prompt, "max_tokens": 3, **extra})
                    assert_error(reply, 400, words, field)
            # ignore_eos: EOS no longer ends the sequence, so it may fill min_tokens
            body = {
                "prompt": "x",
                "max_tokens": 3,
                "allowed_token_ids": [EOS],
                "min_tokens": 1,
                "ignore_eos": True,
            }
            assert (await http.post("/v1/completions", json=body)).status_code == 200
        assert len(scheduler.submitted) == 1

    run(scenario)


def test_the_same_refusal_over_grpc() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with grpc_gateway(scheduler) as address, AsyncClient(address, timeout=10) as client:
            with pytest.raises(InvalidArgument) as info:
                await client.generate("x", allowed_token_ids=[7], bad_words_token_ids=[[7]])
            assert "bad_words_token_ids bans every id of allowed_token_ids" in str(info.value)
            assert info.value.field == "bad_words_token_ids"
        assert scheduler.submitted == []

    run(scenario)


def test_minus_infinity_is_written_as_the_floor() -> None:
    inf = float("-inf")
    tops = [TopLogprob(5, 0.0, "a"), TopLogprob(6, inf, "b"), TopLogprob(7, float("nan"), "c")]
    logprobs = [TokenLogprob(5, 0.0, tops, "a"), TokenLogprob(6, inf, [], "b")]
    prompt = PromptLogprobs(1, "s", [TokenLogprob(6, -20000.0, tops, "b", rank=9)])
    bodies = [
        chat_logprobs_json(logprobs),
        completion_logprobs_json(logprobs, 0, prompt, k=3),
        prompt_logprobs_json(prompt, 3),
    ]
    for body in bodies:
        text = json.dumps(body, allow_nan=False)  # raises on -inf or NaN
        assert text.count(str(LOGPROB_FLOOR)) >= 2
    chat = bodies[0]["content"]
    assert [t["logprob"] for t in chat[0]["top_logprobs"]] == [0.0, LOGPROB_FLOOR, LOGPROB_FLOOR]
    assert chat[1]["logprob"] == LOGPROB_FLOOR
    assert bodies[1]["token_logprobs"] == [None, LOGPROB_FLOOR, 0.0, LOGPROB_FLOOR]
    assert bodies[2][1]["6"] == {"logprob": LOGPROB_FLOOR, "rank": 9, "decoded_token": "b"}
