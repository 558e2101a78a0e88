"""vLLM's `bad_words` at the gateway: read from both endpoints and gRPC, checked (400 naming the
field), and tokenized into the token sequences the scheduler gets (`bad_words_token_ids`). The
stand-in tokenizer spells a character as its code point, and a space as 32 of its own. The
sampler's side is in tests/executor/test_sampler_bad_words.py, the whole path (against
transformers' bad_words_ids) in tests/e2e/test_request_extras.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from gateway_fakes import FakeScheduler
from gateway_harness import JSON, assert_error, grpc_gateway, run, serving

from pagedserve.client import AsyncClient
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import MAX_BAD_WORD_TOKENS, MAX_BAD_WORDS
from pagedserve.gateway.bad_words import bad_word_ids
from pagedserve.gateway.datatypes import Prompt


def test_bad_words_reach_the_scheduler_as_token_sequences() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = {"prompt": "x", "max_tokens": 2, "bad_words": ["ab", "  c"]}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
            chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "bad_words": ["d"]}
            assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
            assert (await http.post("/v1/completions", json={"prompt": "x"})).status_code == 200
        sent = [(s.bad_words, s.bad_words_token_ids) for _, _, s in scheduler.submitted]
        # no special tokens; the spaced form is longer here (a space token), so only the plain one
        assert sent == [
            (["ab", "  c"], [[ord("a"), ord("b")], [ord("c")]]),
            (["d"], [[ord("d")]]),
            ([], []),
        ]

    run(scenario)


def test_the_spaced_form_counts_when_the_space_joins_the_word() -> None:
    # a tokenizer whose " w" is one token (as most BPE vocabularies): both forms are banned
    async def encode(prompt: Prompt) -> list[int]:
        words = prompt.text.split(" ")
        return [1000 + ord(w[0]) if i else ord(w[0]) for i, w in enumerate(words) if w]

    ids = asyncio.run(bad_word_ids(["w", " v"], encode))
    assert ids == [[ord("w")], [1000 + ord("w")], [ord("v")], [1000 + ord("v")]]


def test_bad_words_and_their_sequences_over_grpc() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with grpc_gateway(scheduler) as address, AsyncClient(address, timeout=10) as client:
            await client.generate("x", max_tokens=2, bad_words=["hi"], bad_words_token_ids=[[5, 6], [7]])
            with pytest.raises(InvalidArgument) as info:
                await client.generate("x", bad_words_token_ids=[[]])
            assert "bad_words_token_ids[0] must have 1 to 64 ids, got 0" in str(info.value)
            assert info.value.field == "bad_words_token_ids", "the field rides the call's trailers"
            with pytest.raises(InvalidArgument) as info:
                await client.generate("x", use_beam_search=True, n=2, bad_words=["hi"])
            assert "bad_words are not supported with use_beam_search" in str(info.value)
        ((_, _, sampling),) = scheduler.submitted
        assert sampling.bad_words_token_ids == [[5, 6], [7], [ord("h"), ord("i")]]

    run(scenario)


def test_bad_bad_words_are_400_naming_the_field() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            cases = [
                ("ab", "bad_words must be a list of strings"),
                ([1], "bad_words[0] must be a string, got 1"),
                (
                    ["a"] * (MAX_BAD_WORDS + 1),
                    f"bad_words has 65 words, more than the limit of {MAX_BAD_WORDS}",
                ),
                ([""], "bad_words[0] must have 1 to 256 characters"),
                (["   "], "bad_words[0] must have 1 to 256 characters, not only spaces"),
                (["x" * 257], "bad_words[0] must have 1 to 256 characters"),
                (["é" * (MAX_BAD_WORD_TOKENS + 1)], "bad_words[0] is 65 tokens, more than the limit of 64"),
            ]
            for value, words in cases:
                reply = await http.post("/v1/completions", json={"prompt": "x", "bad_words": value})
                assert_error(reply, 400, words, "bad_words")
            lone = b'{"prompt": "x", "bad_words": ["a\\ud800"]}'  # valid JSON, not valid Unicode
            reply = await http.post("/v1/completions", content=lone, headers=JSON)
            assert_error(reply, 400, "bad_words[0] is not valid Unicode", "bad_words")
            beam = {"prompt": "x", "use_beam_search": True, "n": 2, "bad_words": ["a"]}
            assert_error(
                await http.post("/v1/completions", json=beam), 400, "bad_words are not supported", "bad_words"
            )
        assert scheduler.submitted == []

    run(scenario)
