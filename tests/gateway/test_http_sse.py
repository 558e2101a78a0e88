"""The SSE body of a streaming answer: an error after the first chunk becomes an error event."""

from __future__ import annotations

import asyncio

from pagedserve.common.errors import Unavailable
from pagedserve.gateway.datatypes import ChoiceDelta, FinishReason, RequestOutput, Usage
from pagedserve.gateway.http_api import _sse
from pagedserve.gateway.openai_request import parse_chat, parse_completion
from pagedserve.gateway.openai_response import ChunkFormatter
from pagedserve.gateway.sse import parse_sse


class _Engine:
    def __init__(self) -> None:
        self.closed = []

    def close_later(self, outputs) -> None:
        self.closed.append(outputs)


def _body(
    outputs, first: RequestOutput, include_usage: bool = True, body: dict | None = None
) -> tuple[list, _Engine]:
    body = body or {"prompt": "x", "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    call = parse_completion(body) if "prompt" in body else parse_chat(body)
    engine = _Engine()

    async def read() -> str:
        return b"".join(
            [chunk async for chunk in _sse(engine, outputs, first, ChunkFormatter(call, "c", 1, "m"))]
        )

    return parse_sse(asyncio.run(read()).decode()), engine


def test_stream_ends_with_usage_then_done() -> None:
    async def rest():
        yield RequestOutput(
            "r", [ChoiceDelta(0, "b", [2], finish_reason=FinishReason.LENGTH)], usage=Usage(1, 2, 0)
        )

    outputs = rest()
    events, engine = _body(outputs, RequestOutput("r", [ChoiceDelta(0, "a", [1])]))
    assert [e["choices"][0]["text"] for e in events[:2]] == ["a", "b"]
    assert events[2]["usage"]["completion_tokens"] == 2 and events[2]["choices"] == []
    assert events[3] == "[DONE]"
    assert engine.closed == [outputs], "the generation stream is always closed"


def test_error_after_the_first_chunk_is_an_error_event() -> None:
    async def rest():
        raise Unavailable("scheduler at h:1 is unavailable")
        yield  # an async generator

    events, _ = _body(rest(), RequestOutput("r", [ChoiceDelta(0, "a", [1])]))
    assert events[0]["choices"][0]["text"] == "a"
    assert events[1]["error"]["code"] == "unavailable" and "scheduler" in events[1]["error"]["message"]
    assert events[2] == "[DONE]"


def test_continuous_usage_stats_puts_the_running_usage_in_every_chunk() -> None:
    async def rest():
        yield RequestOutput("r", [ChoiceDelta(0, "b", [2, 3]), ChoiceDelta(1, "c", [4])])
        yield RequestOutput(
            "r",
            [ChoiceDelta(0, "", [5], finish_reason=FinishReason.LENGTH), ChoiceDelta(1, "d", [6])],
            usage=Usage(3, 6, 0),
        )

    body = {
        "messages": [{"role": "user", "content": "x"}],
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    first = RequestOutput("r", [ChoiceDelta(0, "a", [1])], prompt_token_ids=[7, 8, 9])
    events, _ = _body(rest(), first, include_usage=False, body=body)
    assert events[-1] == "[DONE]"
    running = [(e["usage"]["prompt_tokens"], e["usage"]["completion_tokens"]) for e in events[:-2]]
    # the role chunk (the prompt only), then after 1, 4 and 6 completion tokens (choice 0's last
    # token, with no text, shares a chunk with choice 1's "d")
    assert running == [(3, 0), (3, 1), (3, 4), (3, 6)]
    assert all(e["usage"]["total_tokens"] == sum(r) for e, r in zip(events, running, strict=False))
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6


def test_continuous_usage_stats_needs_include_usage() -> None:
    # as in vLLM: without include_usage there is no usage at all, running or final
    async def rest():
        yield RequestOutput(
            "r", [ChoiceDelta(0, "b", [2], finish_reason=FinishReason.LENGTH)], usage=Usage(1, 2)
        )

    body = {"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}}
    events, _ = _body(
        rest(), RequestOutput("r", [ChoiceDelta(0, "a", [1])], prompt_token_ids=[7]), False, body
    )
    assert [e for e in events[:-1] if "usage" in e] == [] and len(events) == 3
