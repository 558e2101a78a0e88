"""POST /tokenize and /detokenize, GET /version, through the gateway's real HTTP server against the
stand-ins of `gateway_fakes` (ids are code points, BOS is 1; the real tokenizer's round trip is
in tests/e2e/test_endpoints.py). Nothing reaches the scheduler on either route."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from gateway_fakes import BOS, MAX_MODEL_LEN, FakeScheduler, FakeTokenizer, text_request
from gateway_harness import JSON, MODEL, assert_error, grpc_gateway, run, serving

from pagedserve import __version__
from pagedserve.client import AsyncClient
from pagedserve.common.errors import InvalidArgument, Unavailable
from pagedserve.gateway.datatypes import PromptKind


def test_tokenize_a_prompt_and_a_chat() -> None:
    async def scenario() -> None:
        scheduler, tokenizer = FakeScheduler(["ok"]), FakeTokenizer()
        async with serving(scheduler, tokenizer) as (url, _), httpx.AsyncClient(base_url=url) as http:
            reply = await http.post("/tokenize", json={"prompt": "hi", "model": MODEL})
            assert reply.status_code == 200, reply.text
            assert reply.json() == {
                "count": 3,
                "max_model_len": MAX_MODEL_LEN,
                "tokens": [BOS, ord("h"), ord("i")],
                "token_strs": None,
            }
            body = {"prompt": "x", "add_special_tokens": False}
            assert (await http.post("/tokenize", json=body)).status_code == 200
            chat = {"messages": [{"role": "user", "content": "yo"}], "add_generation_prompt": False}
            reply = await http.post("/tokenize", json=chat)
            assert reply.json()["tokens"] == [BOS, ord("y"), ord("o")]
            body = {"prompt": "hi", "return_token_strs": True}
            assert (await http.post("/tokenize", json=body)).json()["token_strs"] == ["<s>", "h", "i"]
            # an empty prompt counts zero tokens past the special ones
            assert (await http.post("/tokenize", json={"prompt": ""})).json()["count"] == 1
        text, no_specials, chat_prompt, _, _ = tokenizer.encoded
        assert (text.kind, text.text, text.add_special_tokens) == (PromptKind.TEXT, "hi", True)
        assert no_specials.add_special_tokens is False
        assert chat_prompt.kind is PromptKind.CHAT and chat_prompt.add_generation_prompt is False
        assert scheduler.submitted == []

    run(scenario)


def test_tokenize_refuses_bad_bodies_naming_the_field() -> None:
    async def scenario() -> None:
        scheduler, tokenizer = FakeScheduler(["ok"]), FakeTokenizer()
        async with serving(scheduler, tokenizer) as (url, _), httpx.AsyncClient(base_url=url) as http:
            cases = [
                ({}, "give exactly one of prompt (a string) or messages (a chat)", "prompt"),
                ({"prompt": "a", "messages": []}, "give exactly one of prompt", "prompt"),
                ({"prompt": [1, 2]}, "prompt must be a string", "prompt"),
                ({"prompt": "a", "add_special_tokens": 1}, "add_special_tokens must be true or false", None),
                (
                    {"prompt": "a", "add_generation_prompt": True},
                    "add_generation_prompt is not supported",
                    None,
                ),
                ({"messages": "hi"}, "messages must be a list of {role, content} objects", "messages"),
                (
                    {"messages": [{"role": "user", "content": 5}]},
                    "messages[0].content must be a string",
                    None,
                ),
                (
                    {"messages": [{"role": "user", "content": "a"}], "add_special_tokens": True},
                    "add_special_tokens is not supported: a chat is tokenized as its template renders it",
                    "add_special_tokens",
                ),
                (
                    {"prompt": "a", "return_token_strs": "yes"},
                    "return_token_strs must be true or false",
                    None,
                ),
                ({"prompt": "a", "model": 3}, "model must be a string", "model"),
                ({"prompt": "x" * 1001}, "prompt is 1001 bytes, more than the limit of 1000", "prompt"),
            ]
            for body, words, param in cases:
                assert_error(await http.post("/tokenize", json=body), 400, words, param)
            lone = b'{"prompt": "a\\ud800"}'  # JSON's escape: valid JSON, not valid Unicode
            reply = await http.post("/tokenize", content=lone, headers=JSON)
            assert_error(
                reply, 400, "prompt is not valid Unicode: a lone surrogate \\ud800 at character 1", "prompt"
            )
            reply = await http.post("/tokenize", json={"prompt": "a", "model": "gpt-4"})
            assert_error(reply, 404, f"model 'gpt-4' is not served here; served models: '{MODEL}'", "model")
        assert tokenizer.encoded == [] and scheduler.submitted == []

    run(scenario)


def test_detokenize() -> None:
    async def scenario() -> None:
        scheduler, tokenizer = FakeScheduler(["ok"]), FakeTokenizer()
        async with serving(scheduler, tokenizer) as (url, _), httpx.AsyncClient(base_url=url) as http:
            reply = await http.post("/detokenize", json={"tokens": [BOS, ord("o"), ord("k")], "model": MODEL})
            assert reply.status_code == 200 and reply.json() == {"prompt": "ok"}
            assert (await http.post("/detokenize", json={"tokens": []})).json() == {"prompt": ""}
            body = {"tokens": [ord("a")], "skip_special_tokens": True}
            assert (await http.post("/detokenize", json=body)).json() == {"prompt": "a"}
            (last,) = tokenizer.detokenizer.batches[-1]
            assert last.skip_special_tokens and last.finish
            cases = [
                ({}, "tokens must be a list of integer token ids"),
                ({"tokens": "abc"}, "tokens must be a list of integer token ids"),
                ({"tokens": [1, True]}, "tokens must be a list of integer token ids"),
                ({"tokens": [5, 300]}, "tokens token id 300 is outside the vocabulary [0, 300)"),
                ({"tokens": [-1]}, "tokens token id -1 is outside the vocabulary [0, 300)"),
                ({"tokens": [5], "skip_special_tokens": "yes"}, "skip_special_tokens must be true or false"),
                (
                    {"tokens": [5] * (MAX_MODEL_LEN + 1)},
                    f"tokens has 65 ids, more than max_model_len ({MAX_MODEL_LEN})",
                ),
            ]
            before = len(tokenizer.detokenizer.batches)
            for body, words in cases:
                assert_error(await http.post("/detokenize", json=body), 400, words)
            assert len(tokenizer.detokenizer.batches) == before
        assert scheduler.submitted == []

    run(scenario)


def test_version_and_the_api_key() -> None:
    async def scenario() -> None:
        async with (
            serving(FakeScheduler(["ok"]), api_key="s3cret") as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            assert (await http.get("/version")).json() == {"version": __version__}
            for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [5]})):
                assert_error(await http.post(path, json=body), 401, "missing API key")
                good = {"authorization": "Bearer s3cret"}
                assert (await http.post(path, json=body, headers=good)).status_code == 200

    run(scenario)


def test_non_object_bodies_and_an_empty_chat_are_400() -> None:
    async def scenario() -> None:
        async with serving(FakeScheduler(["ok"])) as (url, _), httpx.AsyncClient(base_url=url) as http:
            for path in ("/tokenize", "/detokenize"):
                for body in ([1, 2], "x", 3):
                    reply = await http.post(path, json=body)
                    assert_error(reply, 400, "the request body must be a JSON object")
            reply = await http.post("/tokenize", json={"messages": []})
            assert_error(reply, 400, "messages must not be empty", "messages")

    run(scenario)


def test_tokenizing_needs_no_scheduler() -> None:
    class DownScheduler(FakeScheduler):
        async def stats(self, timeout=None):
            raise Unavailable("scheduler at test is unavailable")

    async def scenario() -> None:
        async with serving(DownScheduler(["ok"])) as (url, _), httpx.AsyncClient(base_url=url) as http:
            reply = await http.post("/tokenize", json={"prompt": "hi"})
            assert reply.status_code == 200 and reply.json()["max_model_len"] == 0  # not known yet
            reply = await http.post("/detokenize", json={"tokens": [ord("o"), ord("k")]})
            assert reply.json() == {"prompt": "ok"}

    run(scenario)


def test_grpc_tokenize_refuses_add_special_tokens_with_a_chat() -> None:
    async def scenario() -> None:
        async with grpc_gateway(FakeScheduler(["ok"])) as address, AsyncClient(address, timeout=10) as client:
            chat = [{"role": "user", "content": "hi"}]
            assert (await client.tokenize(messages=chat)).token_ids == [BOS, ord("h"), ord("i")]
            with pytest.raises(InvalidArgument, match="add_special_tokens goes with text"):
                await client.tokenize(messages=chat, add_special_tokens=True)
            with pytest.raises(InvalidArgument, match="messages must not be empty"):
                await client.tokenize(messages=[])

    asyncio.run(scenario())


def test_tokenize_calls_take_places_in_the_gateway_queue() -> None:
    """A flood of /tokenize or /detokenize is refused as a flood of generations is: each call
    holds one of `max_queued_requests` places while it runs; draining refuses them too."""

    async def scenario() -> None:
        scheduler, tokenizer = FakeScheduler(["abcdefgh"], gate=asyncio.Event()), FakeTokenizer()
        async with (
            serving(scheduler, tokenizer, max_queued_requests=1) as (url, engine),
            httpx.AsyncClient(base_url=url) as http,
        ):
            full = "the gateway queue is full (1 requests in flight); retry later"
            # a generation holds the one place: both tokenize routes get 429
            outputs = engine.generate(text_request("p", max_tokens=8))
            await anext(outputs)
            assert_error(await http.post("/tokenize", json={"prompt": "hi"}), 429, full)
            assert_error(await http.post("/detokenize", json={"tokens": [1]}), 429, full)
            scheduler.gate.set()
            async for _ in outputs:
                pass
            assert engine.num_in_flight == 0
            # a tokenize call held in the tokenizer holds the place: a completion gets 429
            tokenizer.gate = asyncio.Event()
            held = asyncio.ensure_future(http.post("/tokenize", json={"prompt": "hi"}))
            while engine.num_in_flight == 0:
                await asyncio.sleep(0.01)
            body = {"prompt": "p", "max_tokens": 2}
            assert_error(await http.post("/v1/completions", json=body), 429, full)
            tokenizer.gate.set()
            assert (await held).json()["count"] == 3
            assert engine.num_in_flight == 0
            assert (await http.post("/detokenize", json={"tokens": [104]})).json() == {"prompt": "h"}
            engine.start_drain()
            assert_error(await http.post("/tokenize", json={"prompt": "hi"}), 503, "shutting down")
        assert len(scheduler.submitted) == 1

    run(scenario)
