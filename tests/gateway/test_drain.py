"""Shutdown: new requests get 503 while those in flight run on for --shutdown-timeout; the rest
then end with an error (a final SSE error event and [DONE], a 503, gRPC UNAVAILABLE) and are
aborted in the scheduler. Through the gateway's real HTTP server on a socket."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from gateway_fakes import FakeScheduler
from gateway_harness import assert_error, serving

from pagedserve.common.grpc_utils import GrpcServer
from pagedserve.common.redis_harness import free_port
from pagedserve.gateway.server import drain


def _events(text: str) -> list:
    return [
        json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in text.splitlines() if line
    ]


def test_drain_refuses_new_requests_then_ends_the_rest_with_an_error() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["abcdefgh"], gate=asyncio.Event())
        async with (
            serving(scheduler, shutdown_timeout=0.5) as (url, engine),
            httpx.AsyncClient(base_url=url, timeout=10) as http,
        ):
            streamed = asyncio.ensure_future(
                http.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, "stream": True})
            )
            whole = asyncio.ensure_future(http.post("/v1/completions", json={"prompt": "y", "max_tokens": 8}))
            while len(scheduler.submitted) < 2:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            draining = asyncio.ensure_future(drain(engine, GrpcServer("127.0.0.1", free_port())))
            await asyncio.sleep(0.1)
            assert_error(
                await http.post("/v1/completions", json={"prompt": "z"}),
                503,
                "the gateway is shutting down; send the request to another gateway",
            )
            ready = await http.get("/ready")
            assert ready.status_code == 503 and ready.json() == {"draining": True}
            assert (await http.get("/health")).status_code == 200
            await draining
            assert 0.5 <= time.monotonic() - started < 3.0

            events = _events((await streamed).text)
            assert events[0]["choices"][0]["text"] == "a"
            assert events[-2]["error"]["message"] == (
                "the gateway shut down before the request finished (--shutdown-timeout)"
            )
            assert events[-2]["error"]["code"] == "unavailable" and events[-1] == "[DONE]"
            assert_error(await whole, 503, "the gateway shut down before the request finished")
            await asyncio.sleep(0.05)
            assert set(scheduler.aborted) == {r for r, _, _ in scheduler.submitted[:2]}
            assert engine.num_in_flight == 0

    asyncio.run(scenario())


def test_requests_that_finish_within_the_timeout_are_not_cut() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["abcd"], gate=asyncio.Event())
        async with (
            serving(scheduler, shutdown_timeout=5.0) as (url, engine),
            httpx.AsyncClient(base_url=url, timeout=10) as http,
        ):
            whole = asyncio.ensure_future(http.post("/v1/completions", json={"prompt": "y", "max_tokens": 4}))
            while not scheduler.submitted:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            draining = asyncio.ensure_future(drain(engine, GrpcServer("127.0.0.1", free_port())))
            await asyncio.sleep(0.1)
            scheduler.gate.set()
            await draining
            assert time.monotonic() - started < 1.0, "the drain ends as soon as nothing is in flight"
            reply = await whole
            assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "abcd"
            assert scheduler.aborted == []

    asyncio.run(scenario())
