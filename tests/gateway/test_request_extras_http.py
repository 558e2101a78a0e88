"""vLLM's request extras include_stop_str_in_output and truncate_prompt_tokens over HTTP and gRPC,
against the stand-ins of `gateway_fakes` (ids are code points after BOS = 1)."""

from __future__ import annotations

import asyncio
import json

import httpx
from gateway_fakes import BOS, MAX_MODEL_LEN, FakeScheduler
from gateway_harness import assert_error, grpc_gateway, run, serving

from pagedserve.client import AsyncClient


def test_include_stop_str_in_output() -> None:
    async def scenario() -> None:
        async with (
            serving(FakeScheduler(["say END now"])) as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            body = {"prompt": "x", "max_tokens": 20, "stop": ["END"]}
            assert (await http.post("/v1/completions", json=body)).json()["choices"][0]["text"] == "say "
            body["include_stop_str_in_output"] = True
            whole = (await http.post("/v1/completions", json=body)).json()["choices"][0]
            assert (whole["text"], whole["finish_reason"]) == ("say END", "stop")
            stream = await http.post("/v1/completions", json={**body, "stream": True})
            texts = [line for line in stream.text.splitlines() if line.startswith("data: {")]
            assert "".join(json.loads(t[6:])["choices"][0]["text"] for t in texts) == "say END"
            bad = await http.post("/v1/completions", json={**body, "include_stop_str_in_output": "yes"})
            assert_error(
                bad, 400, "include_stop_str_in_output must be true or false", "include_stop_str_in_output"
            )

    run(scenario)


def test_truncate_prompt_tokens_keeps_the_last_tokens() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = {"prompt": "abcdef", "max_tokens": 2, "truncate_prompt_tokens": 3}
            reply = (await http.post("/v1/completions", json=body)).json()
            assert reply["usage"]["prompt_tokens"] == 3
            ids = {
                "prompt": [1] * 80,
                "max_tokens": 2,
                "truncate_prompt_tokens": 10,
            }  # longer than the context
            assert (await http.post("/v1/completions", json=ids)).status_code == 200
            chat = {
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 2,
                "truncate_prompt_tokens": 2,
            }
            assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
            whole = {"prompt": "ab", "max_tokens": 2, "truncate_prompt_tokens": -1}  # -1: max_model_len
            assert (await http.post("/v1/completions", json=whole)).status_code == 200
            echo = await http.post("/v1/completions", json={**body, "echo": True})
            assert_error(
                echo, 400, "truncate_prompt_tokens cannot be combined with echo", "truncate_prompt_tokens"
            )
            for value in (0, -2, MAX_MODEL_LEN + 1):
                reply = await http.post(
                    "/v1/completions", json={"prompt": "ab", "truncate_prompt_tokens": value}
                )
                words = (
                    f"truncate_prompt_tokens must be -1 or in [1, max_model_len={MAX_MODEL_LEN}], got {value}"
                )
                assert_error(reply, 400, words, "truncate_prompt_tokens")
        prompts = [ids for _, ids, _ in scheduler.submitted]
        assert prompts == [[ord(c) for c in "def"], [1] * 10, [ord("l"), ord("o")], [BOS, ord("a"), ord("b")]]

    run(scenario)


def test_both_over_grpc() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["say END now"])
        async with grpc_gateway(scheduler) as address, AsyncClient(address, timeout=10) as client:
            result = await client.generate(
                "abcdef", max_tokens=20, stop="END", include_stop_str_in_output=True, truncate_prompt_tokens=2
            )
            assert result.choices[0].text == "say END" and result.usage.prompt_tokens == 2
        assert scheduler.submitted[0][1] == [ord("e"), ord("f")]

    asyncio.run(scenario())
