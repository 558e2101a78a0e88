"""The HTTP API's transport limits: content type, body size (declared or chunked), slow bodies
and headers, JSON nesting, unknown routes and unexpected errors, each a JSON error in OpenAI's
shape, through the gateway's real uvicorn server on a socket (`gateway_harness`)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from gateway_fakes import FakeScheduler, FakeTokenizer
from gateway_harness import JSON, assert_error, raw_exchange, run, serving

from pagedserve.gateway.config import RequestLimits
from pagedserve.gateway.http_protocol import PARSER_ENV, http_protocol


@pytest.fixture(autouse=True, params=["httptools", "h11"])
def http_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on both HTTP parsers the gateway can use."""
    monkeypatch.setenv(PARSER_ENV, request.param)
    return request.param


# ---- bodies refused before they are read or parsed ----


def test_non_json_content_type_is_415() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = json.dumps({"prompt": "x"})
            form = await http.post(
                "/v1/completions", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
            )
            assert_error(
                form, 415, "Content-Type must be application/json, got 'application/x-www-form-urlencoded'"
            )
            plain = await http.post(
                "/v1/chat/completions", content=body, headers={"content-type": "text/plain"}
            )
            assert_error(plain, 415, "got 'text/plain'")
            missing = await http.post("/v1/completions", content=body)
            assert_error(missing, 415, "got None")
            ok = await http.post(
                "/v1/completions",
                content=json.dumps({"prompt": "x", "max_tokens": 2}),
                headers={"content-type": "application/json; charset=utf-8"},
            )
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ok"
        assert len(scheduler.submitted) == 1

    run(scenario)


def test_content_length_over_the_limit_is_413_without_reading_the_body() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        limits = RequestLimits(max_request_bytes=1000)
        async with serving(scheduler, limits=limits) as (url, _):
            # 100 MB announced, 10 bytes sent: the answer comes without waiting for the rest.
            started = time.monotonic()
            head = (
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000000\r\n\r\n" + b'{"prompt":'
            )
            reply = await raw_exchange(url, head)
            assert time.monotonic() - started < 2.0, "closed at once, not after a timeout"
            status_line, _, rest = reply.partition(b"\r\n")
            assert status_line == b"HTTP/1.1 413 Request Entity Too Large"
            assert b"connection: close" in rest.lower()
            error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
            assert error["message"] == (
                "the request body is 100000000 bytes, more than the limit of 1000 (the gateway's --max-request-bytes)"
            )
            assert error["code"] == "request_too_large"
        assert scheduler.submitted == []

    run(scenario)


def test_chunked_body_over_the_limit_is_413() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler, limits=RequestLimits(max_request_bytes=1000)) as (url, _):
            # No Content-Length: the body is counted as it is read, and refused past the limit.
            chunk = b"64\r\n" + b" " * 100 + b"\r\n"
            head = (
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            reply = await raw_exchange(url, head + chunk * 20)
            assert reply.startswith(b"HTTP/1.1 413 ")
            error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
            assert error["message"] == (
                "the request body is more than the limit of 1000 bytes (the gateway's --max-request-bytes)"
            )
        assert scheduler.submitted == []

    run(scenario)


def test_a_body_shorter_than_its_content_length_is_408_after_the_read_timeout() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler, limits=RequestLimits(read_timeout=0.3)) as (url, _):
            head = (
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n" + b'{"prompt":'
            )
            started = time.monotonic()
            reply = await raw_exchange(url, head)
            assert 0.25 < time.monotonic() - started < 3.0
            assert reply.startswith(b"HTTP/1.1 408 ")
            error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
            assert error["message"] == "the request body stalled: nothing arrived for 0.3s after 10 bytes"
        assert scheduler.submitted == []

    run(scenario)


def test_slow_or_missing_headers_are_cut_off_after_the_read_timeout() -> None:
    async def scenario() -> None:
        async with serving(FakeScheduler(["ok"]), limits=RequestLimits(read_timeout=0.3)) as (url, _):
            for request in (b"", b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n"):
                started = time.monotonic()
                reply = await raw_exchange(url, request, wait=5.0)
                took = time.monotonic() - started
                assert reply == b"" and 0.25 < took < 3.0, (request, reply, took)
            # A complete request on a kept-alive connection is unaffected by the deadline.
            async with httpx.AsyncClient(base_url=url) as http:
                for _ in range(2):
                    assert (await http.get("/health")).status_code == 200
                    await asyncio.sleep(0.4)

    run(scenario)


def test_pipelined_requests_are_answered_in_order_then_the_idle_connection_closes(http_parser: str) -> None:
    async def scenario() -> None:
        async with serving(FakeScheduler(["ok"]), limits=RequestLimits(read_timeout=0.3)) as (url, _):
            request = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
            started = time.monotonic()
            reply = await raw_exchange(url, request * 3, wait=5.0)
            took = time.monotonic() - started
            assert reply.count(b"HTTP/1.1 200 OK\r\n") == 3, reply
            assert 0.25 < took < 3.0, took  # closed by the header deadline once idle

    run(scenario)


def test_the_parser_is_named_by_the_environment(http_parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert http_protocol(1.0).__name__.lower().startswith(http_parser)
    monkeypatch.setenv(PARSER_ENV, "picohttp")
    with pytest.raises(
        ValueError, match="PAGEDSERVE_HTTP_PARSER must be one of auto, httptools, h11, got 'picohttp'"
    ):
        http_protocol(1.0)


# ---- JSON nesting, routes, unexpected errors ----


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
def test_deeply_nested_json_is_400(depth: int) -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = b'{"prompt": "x", "user": ' + b"[" * depth + b"]" * depth + b"}"
            reply = await http.post("/v1/completions", content=body, headers=JSON)
            assert_error(reply, 400, "the request body nests arrays or objects more than 64 levels deep")
            ok = b'{"prompt": "x", "max_tokens": 2, "user": ' + b"[" * 60 + b"]" * 60 + b"}"
            assert (await http.post("/v1/completions", content=ok, headers=JSON)).status_code == 200
        assert len(scheduler.submitted) == 1

    run(scenario)


def test_an_unexpected_exception_is_a_json_500() -> None:
    class BrokenTokenizer(FakeTokenizer):
        async def info(self):
            raise RuntimeError("boom")

    async def scenario() -> None:
        async with (
            serving(FakeScheduler(["ok"]), BrokenTokenizer()) as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            reply = await http.post("/v1/completions", json={"prompt": "x"})
            error = assert_error(reply, 500, "internal error: RuntimeError")
            assert error["type"] == "internal_error"

    run(scenario)


def test_unknown_routes_and_methods_answer_json() -> None:
    async def scenario() -> None:
        async with serving(FakeScheduler(["ok"])) as (url, _), httpx.AsyncClient(base_url=url) as http:
            assert_error(await http.get("/v1/nope"), 404, "Not Found")
            error = assert_error(await http.get("/v1/completions"), 405, "Method Not Allowed")
            assert error["type"] == "invalid_request_error"

    run(scenario)


def test_many_brackets_that_do_not_nest_deep_are_fine() -> None:
    """A batch of 100 id lists has over 64 brackets but is 3 levels deep."""

    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            reply = await http.post("/v1/completions", json={"prompt": [[1, 5, 6]] * 100, "max_tokens": 1})
            assert reply.status_code == 200, reply.text
            assert [c["index"] for c in reply.json()["choices"]] == list(range(100))
        assert len(scheduler.submitted) == 100

    run(scenario)
