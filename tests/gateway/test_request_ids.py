"""Client-chosen request ids: HTTP's `X-Request-Id` header (or vLLM's body field `request_id`)
becomes the request's id after `cmpl-`/`chatcmpl-` and comes back as the response header; gRPC's
`request_id` is taken as it is. Ids are checked before anything is queued (length, printable,
not already in flight), and an error names the header or field."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from gateway_fakes import FakeScheduler
from gateway_harness import assert_error, grpc_gateway, run, serving

from pagedserve.client import AsyncClient
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.request_ids import MAX_REQUEST_ID_CHARS

CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
TEXT = {"prompt": "x", "max_tokens": 2}


def test_a_client_id_names_the_request_and_comes_back() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            header = {"X-Request-Id": "trace-42"}
            reply = await http.post("/v1/completions", json=TEXT, headers=header)
            assert reply.json()["id"] == "cmpl-trace-42" and reply.headers["x-request-id"] == "trace-42"
            reply = await http.post("/v1/chat/completions", json=CHAT, headers=header)
            assert reply.json()["id"] == "chatcmpl-trace-42" and reply.headers["x-request-id"] == "trace-42"
            # vLLM's body field; the header wins over it
            reply = await http.post("/v1/completions", json={**TEXT, "request_id": "body-1"})
            assert reply.json()["id"] == "cmpl-body-1" and reply.headers["x-request-id"] == "body-1"
            reply = await http.post("/v1/completions", json={**TEXT, "request_id": "body-1"}, headers=header)
            assert reply.json()["id"] == "cmpl-trace-42"
            # none given: the header carries the response's own id
            reply = await http.post("/v1/completions", json=TEXT)
            assert reply.headers["x-request-id"] == reply.json()["id"] and reply.json()["id"].startswith(
                "cmpl-"
            )
            # streamed, and a batch of prompts (one request each, numbered)
            streamed = {**TEXT, "stream": True}
            async with http.stream("POST", "/v1/completions", json=streamed, headers=header) as stream:
                assert stream.headers["x-request-id"] == "trace-42"
                lines = [line[6:] async for line in stream.aiter_lines() if line.startswith("data: {")]
            assert {json.loads(line)["id"] for line in lines} == {"cmpl-trace-42"}
            batch = {"prompt": ["a", "b"], "max_tokens": 2}
            assert (await http.post("/v1/completions", json=batch, headers=header)).status_code == 200
        assert [rid for rid, _, _ in scheduler.submitted] == [
            "cmpl-trace-42",
            "chatcmpl-trace-42",
            "cmpl-body-1",
            "cmpl-trace-42",
            scheduler.submitted[4][0],
            "cmpl-trace-42",
            "cmpl-trace-42-0",
            "cmpl-trace-42-1",
        ]

    run(scenario)


def test_bad_or_busy_ids_are_400_naming_the_header_or_field() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        scheduler = FakeScheduler(["ok"], gate=gate)
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url, timeout=10) as http:
            cases = [
                (
                    {"X-Request-Id": "x" * 129},
                    {},
                    "X-Request-Id must be 1 to 128 printable characters",
                    "X-Request-Id",
                ),
                ({"X-Request-Id": ""}, {}, "got 0 characters", "X-Request-Id"),
                ({}, {"request_id": 5}, "request_id must be a string, got 5", "request_id"),
                ({}, {"request_id": "a\x07b"}, "request_id must be 1 to 128 printable", "request_id"),
                # sent back as a header: ASCII, no space at either end (a 500 after the whole
                # generation, or a dropped connection, before)
                ({}, {"request_id": "日本"}, "request_id must be ASCII without a space", "request_id"),
                ({}, {"request_id": "a "}, "request_id must be ASCII without a space", "request_id"),
                ({}, {"request_id": " "}, "request_id must be ASCII", "request_id"),
            ]
            for headers, extra, words, field in cases:
                reply = await http.post("/v1/completions", json={**TEXT, **extra}, headers=headers)
                assert_error(reply, 400, words, field)
                assert "x-request-id" not in reply.headers, "an id refused is not echoed"
            # a good id on a request refused while its body is read still comes back
            for content in ('{"prompt": "x", "max_tokens": -1}', "{not json"):
                reply = await http.post(
                    "/v1/completions",
                    content=content,
                    headers={"X-Request-Id": "trace-7", "Content-Type": "application/json"},
                )
                assert reply.status_code == 400 and reply.headers["x-request-id"] == "trace-7"
            assert scheduler.submitted == []
            # the same id twice at once: the second is refused, the first goes on
            header = {"X-Request-Id": "same"}
            first = asyncio.create_task(http.post("/v1/completions", json=TEXT, headers=header))
            while not scheduler.submitted:
                await asyncio.sleep(0.01)
            reply = await http.post("/v1/completions", json=TEXT, headers=header)
            assert_error(reply, 400, "request_id 'cmpl-same' is already in flight", "request_id")
            gate.set()
            assert (await first).status_code == 200
            assert (await http.post("/v1/completions", json=TEXT, headers=header)).status_code == 200

    run(scenario)


def test_grpc_request_ids_are_bounded() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with grpc_gateway(scheduler) as address, AsyncClient(address, timeout=10) as client:
            for bad in ("r" * (MAX_REQUEST_ID_CHARS + 1), "tab\there"):
                with pytest.raises(InvalidArgument) as info:
                    await client.generate("x", max_tokens=2, request_id=bad)
                assert f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} printable characters" in str(
                    info.value
                )
                assert info.value.field == "request_id"
                assert len(str(info.value)) < 200, "the message does not repeat the id"
            result = await client.generate("x", max_tokens=2, request_id="r" * MAX_REQUEST_ID_CHARS)
            assert result.request_id == "r" * MAX_REQUEST_ID_CHARS
        assert [rid for rid, _, _ in scheduler.submitted] == ["r" * MAX_REQUEST_ID_CHARS]

    run(scenario)
