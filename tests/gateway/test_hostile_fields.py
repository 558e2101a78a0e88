"""Field values that used to get through to a failure later, now refused up front (400 /
INVALID_ARGUMENT naming the field): a beam length_penalty whose power overflows (it crashed the
scheduler's step and left the request hanging with its blocks), beam search with structured
output (ignored before), non-finite temperature or repetition_penalty over gRPC, an unknown
early_stopping number over gRPC (UNKNOWN before), a tool whose $defs is not an object (500
before), a JSON schema whose patterns repeat so much that building its grammar takes seconds
to minutes, or one that only fails to compile (a minLength of -5: a 200 with an empty answer
before). A temperature too small to divide by samples greedily."""

from __future__ import annotations

import httpx
import pytest
from gateway_fakes import FakeScheduler
from gateway_harness import assert_error, grpc_gateway, run, serving

from pagedserve.client import AsyncClient
from pagedserve.common.errors import InvalidArgument
from pagedserve.gateway.grpc_service import request_from_proto
from pagedserve.v1 import gateway_pb2

CHAT = [{"role": "user", "content": "x"}]
BEAM = {"prompt": "x", "max_tokens": 4, "use_beam_search": True, "n": 2}
BAD_DEFS_TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "$defs": [1, 2]}},
}


@pytest.mark.parametrize(
    ("path", "body", "words", "field"),
    [
        ("/v1/completions", {**BEAM, "length_penalty": 2000.0}, "length_penalty must be in [-10, 10]", "length_penalty"),
        ("/v1/completions", {**BEAM, "length_penalty": -10.5}, "got -10.5", "length_penalty"),
        ("/v1/completions", {**BEAM, "guided_choice": ["yes", "no"]}, "use_beam_search cannot be combined with structured output", "use_beam_search"),
        ("/v1/completions", {**BEAM, "n": 1, "structured_outputs": {"regex": "[0-9]{4}"}}, "structured output", "use_beam_search"),
        ("/v1/chat/completions", {"messages": CHAT, "use_beam_search": True, "n": 2, "response_format": {"type": "json_object"}}, "structured output", "use_beam_search"),
        ("/v1/chat/completions", {"messages": CHAT, "tools": [BAD_DEFS_TOOL], "tool_choice": "required"}, "tools[0].function.parameters.$defs must be an object", "tools"),
        ("/tokenize", {"messages": CHAT, "tools": [BAD_DEFS_TOOL], "tool_choice": "required"}, "$defs must be an object", "tools"),
        ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "string", "minLength": -5}}}}, "Invalid repetition range", "response_format.json_schema.schema"),
        ("/v1/completions", {"prompt": "x", "guided_json": {"type": "string", "pattern": "(a|b){0, 3000}"}}, "add up to 9000000", "guided_json"),
        ("/v1/completions", {"prompt": "x", "guided_json": {"type": "string", "pattern": "(a|b){1,10000}"}}, "repetition counts in its patterns are too large", "guided_json"),
        ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "patternProperties": {"^k{300}$": {"type": "string", "pattern": "[a-z]{0,200}"}}}}}}, "add up to 130000", "response_format.json_schema.schema"),
    ],
)  # fmt: skip
def test_http_refusals(path: str, body: dict, words: str, field: str) -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            assert_error(await http.post(path, json=body), 400, words, field)
            # the same request within the limits is served
            if "length_penalty" in body:
                fine = await http.post(path, json={**body, "length_penalty": 10.0})
                assert fine.status_code == 200, fine.text
            if "guided_json" in body:  # one {m,256} is within the limit
                fine = {**body, "guided_json": {"type": "string", "pattern": "^[a-z]{1,256}$"}}
                assert (await http.post(path, json=fine)).status_code == 200
        assert len(scheduler.submitted) == ("length_penalty" in body or "guided_json" in body)

    run(scenario)


def test_grpc_refusals() -> None:
    def sampling(**fields) -> gateway_pb2.GenerateRequest:
        return gateway_pb2.GenerateRequest(text="x", sampling=gateway_pb2.GenerateSamplingParams(**fields))

    for value in (7, -1):
        with pytest.raises(InvalidArgument) as info:
            request_from_proto(sampling(use_beam_search=True, n=2, early_stopping=value))
        assert info.value.field == "early_stopping" and f"got {value}" in info.value.message

    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with grpc_gateway(scheduler) as address, AsyncClient(address, timeout=10) as client:
            cases = [
                ({"temperature": float("inf")}, "temperature"),
                ({"repetition_penalty": float("inf")}, "repetition_penalty"),
                ({"use_beam_search": True, "n": 2, "length_penalty": 3e38}, "length_penalty"),
            ]
            for kwargs, field in cases:
                with pytest.raises(InvalidArgument) as info:
                    await client.generate("x", max_tokens=2, **kwargs)
                assert info.value.field == field, (kwargs, info.value)
            await client.generate("x", max_tokens=2, temperature=1e-38)
        ((_, _, tiny),) = scheduler.submitted
        assert 0 < tiny.temperature < 1e-37 and tiny.greedy, "a temperature too small to divide by is greedy"

    run(scenario)


def test_a_chats_every_field_and_message_count_against_the_tokenizer_limit() -> None:
    """The stand-in tokenizer takes 1,000 bytes: 60 empty messages (16 bytes of framing each,
    and their roles) or one 2,000-byte name are over it, refused before anything is sent."""

    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, engine), httpx.AsyncClient(base_url=url) as http:
            many = {"messages": [{"role": "user", "content": ""}] * 60, "max_tokens": 2}
            assert_error(await http.post("/v1/chat/completions", json=many), 400, "1200 bytes", "messages")
            named = {"messages": [{"role": "user", "content": "x", "name": "n" * 2000}], "max_tokens": 2}
            assert_error(
                await http.post("/v1/chat/completions", json=named), 400, "more than the limit", "messages"
            )
            kwargs = {"messages": CHAT, "max_tokens": 2, "chat_template_kwargs": {"k": "v" * 2000}}
            error = assert_error(
                await http.post("/v1/chat/completions", json=kwargs), 400, "more than the limit"
            )
            assert error["param"] == "chat_template_kwargs", "the biggest part is named"
            assert engine.tokenizer.encoded == []
            few = {"messages": [{"role": "user", "content": ""}] * 10, "max_tokens": 2}
            assert (await http.post("/v1/chat/completions", json=few)).status_code == 200
        assert len(scheduler.submitted) == 1

    run(scenario)


def test_a_huge_token_id_is_named_by_its_size_not_its_digits() -> None:
    async def scenario() -> None:
        async with serving(FakeScheduler(["ok"])) as (url, _), httpx.AsyncClient(base_url=url) as http:
            for body in ({"prompt": [1, 10**4000]}, {"prompt": "x", "allowed_token_ids": [10**4000]}):
                reply = await http.post("/v1/completions", json=body)
                error = assert_error(reply, 400, "an integer of 13288 bits is outside the vocabulary")
                assert len(error["message"]) < 200

    run(scenario)
