"""The HTTP API's limits, names and auth, through the gateway's real uvicorn server on a socket.

The engine runs against the in-process tokenizer and scheduler stand-ins of
`test_gateway_engine` (the same paths run against the real services in
tests/e2e/test_gateway_limits.py). Every case asserts the status and the message, and that
nothing reached the scheduler when the request was refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from test_gateway_engine import FakeScheduler, FakeTokenizer

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.redis_harness import free_port
from pagedserve.gateway.config import GatewayConfig, RequestLimits
from pagedserve.gateway.datatypes import Prompt
from pagedserve.gateway.engine import Engine
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.gateway.server import http_server

MODEL = "/models/tiny-py"
JSON = {"content-type": "application/json"}


@contextlib.asynccontextmanager
async def serving(
    scheduler: FakeScheduler, tokenizer: FakeTokenizer | None = None, **config
) -> AsyncIterator[tuple[str, Engine]]:
    """The gateway's HTTP server on a free port; yields (base url, engine)."""
    port = free_port()
    cfg = GatewayConfig(host="127.0.0.1", http_port=port, model=MODEL, **config)
    engine = Engine(cfg, tokenizer or FakeTokenizer(), scheduler)
    server = http_server(engine, GatewayMetrics())
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the HTTP server did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        await task


def run(scenario) -> None:
    asyncio.run(scenario())


def assert_error(reply: httpx.Response, status: int, words: str, param: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


async def raw_exchange(url: str, request: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or `wait` runs out)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                data += chunk
    writer.close()
    return data


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


# ---- bodies that used to be a 500 ----


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        (
            b'{"prompt": "x", "seed": 18446744073709551616}',
            400,
            "seed",
            "seed must be <= 9223372036854775807, got 18446744073709551616",
        ),
        (
            b'{"prompt": "x", "seed": -9223372036854775809}',
            400,
            "seed",
            "seed must be >= -9223372036854775808",
        ),
        (
            b'{"prompt": "x", "priority": 2147483648}',
            400,
            "priority",
            "priority must be <= 2147483647, got 2147483648",
        ),
        (b'{"prompt": "x", "top_k": 2147483648}', 400, "top_k", "top_k must be <= 2147483647"),
        (b'{"prompt": "x", "max_tokens": 4294967296}', 400, "max_tokens", "max_tokens must be <= 2147483647"),
        (
            b'{"prompt": "\\ud800"}',
            400,
            "prompt",
            "prompt is not valid Unicode: a lone surrogate \\ud800 at character 0",
        ),
        (
            b'{"prompt": ["ok", "a\\udfff"]}',
            400,
            "prompt",
            "prompt[1] is not valid Unicode: a lone surrogate \\udfff at character 1",
        ),
        (b'{"prompt": "x", "stop": ["\\ud800"]}', 400, "stop", "stop[0] is not valid Unicode"),
        (b'{"prompt": "x", "model": "\\ud800"}', 400, "model", "model is not valid Unicode"),
        (
            b'{"prompt": "x", "temperature": NaN}',
            400,
            "temperature",
            "temperature must be a finite number, got nan",
        ),
        (b'{"prompt": "x", "top_p": 1e999}', 400, "top_p", "top_p must be a finite number, got inf"),
        (
            b'{"prompt": "x", "temperature": 1e300}',
            400,
            "temperature",
            "temperature must be at most 3.403e+38 in size",
        ),
        (b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}", 400, None, "the request body is not valid JSON"),
        (b'{"prompt": "x"', 400, None, "the request body is not valid JSON"),
        (b'"just a string"', 400, None, "the request body must be a JSON object"),
    ],
)
def test_values_that_do_not_fit_are_400_naming_the_field(
    body: bytes, status: int, param: str | None, message: str
) -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            assert_error(
                await http.post("/v1/completions", content=body, headers=JSON), status, message, param
            )
        assert scheduler.submitted == []

    run(scenario)


def test_a_lone_surrogate_in_a_chat_message_is_400() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'
            reply = await http.post("/v1/chat/completions", content=body, headers=JSON)
            assert_error(
                reply,
                400,
                "messages[0].content is not valid Unicode: a lone surrogate \\ud800 at character 3",
                "messages",
            )
        assert scheduler.submitted == []

    run(scenario)


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


# ---- sizes a request asks for ----


def test_huge_n_is_refused_at_once_without_allocating() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            for path, body in (
                ("/v1/completions", {"prompt": "x", "n": 1099511627776}),
                (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "x"}], "n": 1099511627776},
                ),
                ("/v1/completions", {"prompt": "x", "n": 1099511627776, "stream": True}),
            ):
                started = time.monotonic()
                reply = await http.post(path, json=body)
                assert time.monotonic() - started < 0.5
                assert_error(reply, 400, "n must be <= 128 (the gateway's --max-n), got 1099511627776", "n")
            reply = await http.post("/v1/completions", json={"prompt": "x", "n": 129})
            assert_error(reply, 400, "n must be <= 128 (the gateway's --max-n), got 129", "n")
            reply = await http.post("/v1/completions", json={"prompt": "x", "n": 128, "max_tokens": 1})
            assert reply.status_code == 200 and len(reply.json()["choices"]) == 128
        assert len(scheduler.submitted) == 1

    run(scenario)


def test_stop_strings_are_limited_in_count_and_length() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            many = [f"s{i}" for i in range(1000)]
            reply = await http.post("/v1/completions", json={"prompt": "x", "n": 128, "stop": many})
            assert_error(reply, 400, "stop has 1000 strings, more than the limit of 64", "stop")
            long = ["x" * 3000, "y" * 2000]
            reply = await http.post("/v1/completions", json={"prompt": "x", "stop": long})
            assert_error(
                reply, 400, "stop strings are 5000 characters in all, more than the limit of 4096", "stop"
            )
        assert scheduler.submitted == []

    run(scenario)


def test_batched_prompts_are_limited_by_max_n() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with (
            serving(scheduler, limits=RequestLimits(max_n=8)) as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            reply = await http.post("/v1/completions", json={"prompt": ["a"] * 9})
            assert_error(reply, 400, "prompt is a batch of 9 prompts, more than the limit of 8", "prompt")
            reply = await http.post("/v1/completions", json={"prompt": ["a"] * 3, "n": 3})
            assert_error(reply, 400, "3 prompts x n=3 = 9 choices, more than the limit of 8", "prompt")
        assert scheduler.submitted == []

    run(scenario)


def test_full_queue_is_429_with_retry_after() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["abcd"], gate=asyncio.Event())
        async with (
            serving(scheduler, max_queued_requests=1) as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            first = asyncio.ensure_future(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4}))
            while not scheduler.submitted:
                await asyncio.sleep(0.01)
            reply = await http.post("/v1/completions", json={"prompt": "x"})
            assert_error(reply, 429, "the gateway queue is full (1 requests in flight); retry later")
            assert reply.headers["retry-after"] == "1"
            scheduler.gate.set()
            assert (await first).status_code == 200

    run(scenario)


# ---- model names ----


def test_served_names_default_to_model_as_given() -> None:
    async def scenario() -> None:
        async with serving(FakeScheduler(["ok"])) as (url, _), httpx.AsyncClient(base_url=url) as http:
            models = (await http.get("/v1/models")).json()["data"]
            assert [(m["id"], m["root"], m["object"]) for m in models] == [(MODEL, MODEL, "model")]
            card = await http.get(f"/v1/models/{MODEL}")  # /v1/models//models/tiny-py
            assert card.status_code == 200 and card.json()["id"] == MODEL
            reply = await http.post("/v1/completions", json={"prompt": "x", "model": MODEL, "max_tokens": 1})
            assert reply.status_code == 200 and reply.json()["model"] == MODEL
            reply = await http.post("/v1/completions", json={"prompt": "x", "model": "tiny-py"})
            assert_error(reply, 404, f"model 'tiny-py' is not served here; served models: '{MODEL}'", "model")

    run(scenario)


def test_several_served_names_first_reported() -> None:
    names = ("org/tiny", "tiny-py")

    async def scenario() -> None:
        async with (
            serving(FakeScheduler(["ok"]), served_model_names=names) as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            models = (await http.get("/v1/models")).json()["data"]
            assert [(m["id"], m["root"]) for m in models] == [("org/tiny", MODEL), ("tiny-py", MODEL)]
            for name in names:
                card = await http.get(f"/v1/models/{name}")
                assert card.status_code == 200 and card.json()["id"] == name and card.json()["root"] == MODEL
            unknown = await http.get("/v1/models/gpt-4")
            assert_error(
                unknown,
                404,
                "model 'gpt-4' is not served here; served models: 'org/tiny', 'tiny-py'",
                "model",
            )
            assert unknown.json()["error"]["code"] == "model_not_found"
            for body in (
                {"prompt": "x"},
                {"prompt": "x", "model": "tiny-py"},
                {"prompt": "x", "model": "org/tiny"},
            ):
                reply = await http.post("/v1/completions", json={**body, "max_tokens": 1})
                assert reply.status_code == 200 and reply.json()["model"] == "org/tiny", reply.text
            chat = {"messages": [{"role": "user", "content": "x"}], "model": "tiny-py", "max_tokens": 1}
            reply = await http.post("/v1/chat/completions", json=chat)
            assert reply.status_code == 200 and reply.json()["model"] == "org/tiny"
            reply = await http.post("/v1/chat/completions", json={**chat, "model": MODEL})
            assert_error(
                reply, 404, f"model '{MODEL}' is not served here; served models: 'org/tiny', 'tiny-py'"
            )

    run(scenario)


# ---- API key ----


def test_api_key_guards_v1_and_optionally_metrics() -> None:
    async def scenario(protect_metrics: bool) -> None:
        async with (
            serving(FakeScheduler(["ok"]), api_key="s3cret", protect_metrics=protect_metrics) as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            body = {"prompt": "x", "max_tokens": 1}
            missing = await http.post("/v1/completions", json=body)
            error = assert_error(missing, 401, "missing API key: send 'Authorization: Bearer <key>'")
            assert error["code"] == "invalid_api_key" and missing.headers["www-authenticate"] == "Bearer"
            wrong = await http.post("/v1/completions", json=body, headers={"authorization": "Bearer s3cre"})
            assert_error(wrong, 401, "invalid API key")
            basic = await http.get("/v1/models", headers={"authorization": "Basic s3cret"})
            assert_error(basic, 401, "invalid API key")
            good = {"authorization": "Bearer s3cret"}
            assert (await http.post("/v1/completions", json=body, headers=good)).status_code == 200
            assert (await http.get("/v1/models", headers=good)).status_code == 200
            assert (await http.get("/health")).status_code == 200
            metrics = await http.get("/metrics")
            if protect_metrics:
                assert_error(metrics, 401, "missing API key")
                assert (await http.get("/metrics", headers=good)).status_code == 200
            else:
                assert metrics.status_code == 200

    asyncio.run(scenario(False))
    asyncio.run(scenario(True))


# ---- OpenAI breadth ----


def test_a_batch_of_prompts_numbers_choices_as_openai() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ab", "cd"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = {"prompt": ["p", [1, 5, 6]], "n": 2, "max_tokens": 2, "return_token_ids": True}
            whole = (await http.post("/v1/completions", json=body)).json()
            assert [(c["index"], c["text"]) for c in whole["choices"]] == [
                (0, "ab"),
                (1, "cd"),
                (2, "ab"),
                (3, "cd"),
            ]
            assert [c["prompt_token_ids"] for c in whole["choices"]] == [[1, ord("p")]] * 2 + [[1, 5, 6]] * 2
            assert whole["usage"]["prompt_tokens"] == 2 + 3 and whole["usage"]["completion_tokens"] == 8
            assert len(scheduler.submitted) == 2

            stream = await http.post(
                "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
            )
            events = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
            texts: dict[int, str] = {}
            for event in events:
                for c in event["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            assert texts == {0: "ab", 1: "cd", 2: "ab", 3: "cd"}
            assert events[-1]["usage"]["completion_tokens"] == 8 and events[-1]["choices"] == []
            assert stream.text.rstrip().endswith("data: [DONE]")

    run(scenario)


def test_a_batch_is_validated_whole_before_any_prompt_is_submitted() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ab"])
        async with serving(scheduler) as (url, engine), httpx.AsyncClient(base_url=url) as http:
            reply = await http.post("/v1/completions", json={"prompt": ["fine", [1, 999]]})
            assert_error(reply, 400, "prompt token id 999 is outside the vocabulary [0, 300)", "prompt")
            assert scheduler.submitted == [] and engine.num_in_flight == 0

    run(scenario)


class StrictRolesTokenizer(FakeTokenizer):
    """A chat template that knows only system, user and assistant (as most do)."""

    async def encode(self, prompt: Prompt) -> list[int]:
        for m in prompt.messages:
            if m.role not in ("system", "user", "assistant"):
                raise InvalidArgument(f"the chat template rejected the messages: role {m.role}", field="chat")
        return await super().encode(prompt)


@pytest.mark.parametrize(
    ("tokenizer", "roles"), [(StrictRolesTokenizer, ["system"]), (FakeTokenizer, ["developer"])]
)
def test_developer_role_is_system_where_the_template_refuses_it(tokenizer, roles: list[str]) -> None:
    async def scenario() -> None:
        tok = tokenizer()
        async with serving(FakeScheduler(["ok"]), tok) as (url, _), httpx.AsyncClient(base_url=url) as http:
            messages = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "hi"}]
            reply = await http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == "ok"
            assert [m.role for m in tok.encoded[-1].messages] == [*roles, "user"]
            robot = [{"role": "robot", "content": "hi"}]
            reply = await http.post("/v1/chat/completions", json={"messages": robot, "max_tokens": 2})
            if tokenizer is StrictRolesTokenizer:
                assert_error(reply, 400, "role robot")

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


def test_echo_puts_each_prompt_before_its_choices() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ab"])
        async with serving(scheduler) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = {"prompt": ["p: ", [1, 0x41, 0x42]], "n": 2, "max_tokens": 2, "echo": True}
            whole = (await http.post("/v1/completions", json=body)).json()
            # The stand-in detokenizer drops BOS (1) and maps other ids to their code points.
            assert [c["text"] for c in whole["choices"]] == ["p: ab", "p: ab", "ABab", "ABab"]
            assert whole["usage"]["completion_tokens"] == 8

            stream = await http.post("/v1/completions", json={**body, "stream": True})
            events = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
            texts: dict[int, str] = {}
            for event in events:
                for c in event["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            assert texts == {0: "p: ab", 1: "p: ab", 2: "ABab", 3: "ABab"}

            reply = await http.post("/v1/completions", json={"prompt": "x", "echo": True, "logprobs": 21})
            assert_error(reply, 400, "logprobs must be in [0, 20], got 21", "logprobs")

    run(scenario)
