"""OpenAI's `logit_bias` over HTTP (both endpoints) and gRPC: parsed, checked (400 naming the
field), and handed to the scheduler as token id -> bias. The sampler's side is in
tests/executor/test_sampler_logit_bias.py, the whole path in tests/e2e/test_request_extras.py."""

from __future__ import annotations

import asyncio

import httpx
from gateway_fakes import FakeScheduler
from gateway_harness import JSON, assert_error, grpc_gateway, run, serving

from pagedserve.client import AsyncClient
from pagedserve.common.errors import InvalidArgument


def test_logit_bias_reaches_the_scheduler_from_both_endpoints() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = {"prompt": "x", "max_tokens": 2, "logit_bias": {"65": 5, "66": -100, "67": 0.5}}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
            chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logit_bias": {"7": 1}}
            assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
            assert (
                await http.post("/v1/completions", json={"prompt": "x", "logit_bias": None})
            ).status_code == 200
        biases = [sampling.logit_bias for _, _, sampling in scheduler.submitted]
        assert biases == [{65: 5.0, 66: -100.0, 67: 0.5}, {7: 1.0}, {}]

    run(scenario)


def test_bad_logit_bias_is_400_naming_the_field() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            cases = [
                ([1, 2], 'logit_bias must be an object of {"token id": bias}'),
                ({"a": 1}, "logit_bias keys must be token ids, got 'a'"),
                ({"1.5": 1}, "logit_bias keys must be token ids, got '1.5'"),
                ({"--5": 1}, "logit_bias keys must be token ids, got '--5'"),
                ({"1" * 12: 1}, "logit_bias keys must be token ids, got '111111111111'"),
                ({"5": "high"}, "logit_bias[5] must be a number, got 'high'"),
                ({"5": True}, "logit_bias[5] must be a number, got True"),
                ({"5": 101}, "logit_bias[5] must be in [-100, 100], got 101"),
                ({"5": 10**400}, "logit_bias[5] must be in [-100, 100], got an integer of 1329 bits"),
                ({"300": 1}, "logit_bias: token id 300 is outside the vocabulary [0, 300)"),
                ({"-1": 1}, "logit_bias: token id -1 is outside the vocabulary [0, 300)"),
                ({str(i): 1 for i in range(1025)}, "logit_bias has 1025 tokens, more than the limit of 1024"),
            ]
            for bias, words in cases:
                reply = await http.post("/v1/completions", json={"prompt": "x", "logit_bias": bias})
                assert_error(reply, 400, words, "logit_bias")
            nan = b'{"prompt": "x", "logit_bias": {"5": NaN}}'
            assert (await http.post("/v1/completions", content=nan, headers=JSON)).status_code == 400
            beam = {"prompt": "x", "use_beam_search": True, "n": 2, "logit_bias": {"5": 1}}
            assert_error(
                await http.post("/v1/completions", json=beam),
                400,
                "logit_bias is not supported with use_beam_search",
            )
        assert scheduler.submitted == []

    run(scenario)


def test_logit_bias_over_grpc() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with grpc_gateway(scheduler) as address, AsyncClient(address, timeout=10) as client:
            await client.generate(
                "x", max_tokens=2, logit_bias={65: 3, "66": -1.5}
            )  # OpenAI's string keys too
            try:
                await client.generate("x", logit_bias={400: 1.0})
            except InvalidArgument as err:
                assert err.message == "logit_bias: token id 400 is outside the vocabulary [0, 300)"
            else:
                raise AssertionError("an id outside the vocabulary was taken")
        assert [s.logit_bias for _, _, s in scheduler.submitted] == [{65: 3.0, 66: -1.5}]

    asyncio.run(scenario())


def test_allowed_token_ids_reach_the_scheduler_and_are_checked() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = {"prompt": "x", "max_tokens": 2, "allowed_token_ids": [65, 66]}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
            reply = await http.post("/v1/completions", json={**body, "allowed_token_ids": [65, 300]})
            assert_error(
                reply, 400, "allowed_token_ids: 300 is outside the vocabulary [0, 300)", "allowed_token_ids"
            )
            reply = await http.post("/v1/completions", json={**body, "allowed_token_ids": ["a"]})
            assert_error(reply, 400, "allowed_token_ids must be a list of integers", "allowed_token_ids")
            reply = await http.post("/v1/completions", json={**body, "allowed_token_ids": []})
            assert_error(reply, 400, "allowed_token_ids must not be empty", "allowed_token_ids")
            null = await http.post("/v1/completions", json={**body, "allowed_token_ids": None})
            assert null.status_code == 200  # null is left out, as every optional field
        assert [s.allowed_token_ids for _, _, s in scheduler.submitted] == [[65, 66], []]

    run(scenario)
