"""The HTTP API's request limits, names and auth, through the gateway's real uvicorn server on a
socket (`gateway_harness`; the transport's limits are in test_http_transport.py).

The engine runs against the in-process tokenizer and scheduler stand-ins of
`gateway_fakes` (the same paths run against the real services in
tests/e2e/test_gateway_limits.py). Every case asserts the status and the message, and that
nothing reached the scheduler when the request was refused.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from gateway_fakes import FakeScheduler, FakeTokenizer
from gateway_harness import JSON, MODEL, assert_error, run, serving

from pagedserve.common.errors import InvalidArgument
from pagedserve.gateway.config import RequestLimits
from pagedserve.gateway.datatypes import Prompt

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
