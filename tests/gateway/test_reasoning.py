"""--reasoning-parser: a chat choice's <think>...</think> goes to `reasoning`, the answer to
`content`, whole and streamed (the stream's pieces add up to the whole split, however the text
is cut into deltas); tool calls are looked for in the answer; completions keep the raw text."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from gateway_fakes import FakeScheduler
from gateway_harness import run, serving

from pagedserve.gateway.datatypes import FinishReason
from pagedserve.gateway.openai_response import chat_message
from pagedserve.gateway.reasoning import PARSERS, ReasoningStream, split_reasoning
from pagedserve.gateway.tool_calls import ToolChoice

TEXTS = [
    "<think>plan it</think>the answer",
    "\n<think>\nplan</think>\n\nanswer",
    "plan only, in R1's way</think>answer",
    "<think>cut short by max_tokens",
    "no tags at all",
    "<think></think>",
    "a</thin>b</think><think>c",  # a near-miss tag, then a second <think> that is answer text
    "<thinking>x</think>y",
    "",
    "<",
]


@pytest.mark.parametrize(
    ("parser", "text", "reasoning", "content"),
    [
        ("deepseek_r1", TEXTS[0], "plan it", "the answer"),
        ("deepseek_r1", TEXTS[1], "\nplan", "\n\nanswer"),
        ("deepseek_r1", TEXTS[2], "plan only, in R1's way", "answer"),
        ("deepseek_r1", TEXTS[3], "cut short by max_tokens", None),
        ("deepseek_r1", TEXTS[4], "no tags at all", None),
        ("deepseek_r1", TEXTS[6], "a</thin>b", "<think>c"),
        ("qwen3", TEXTS[0], "plan it", "the answer"),
        ("qwen3", TEXTS[2], None, TEXTS[2]),  # qwen3 thinks only when it opens with <think>
        ("qwen3", TEXTS[3], "cut short by max_tokens", None),
        ("qwen3", TEXTS[4], None, "no tags at all"),
        ("qwen3", TEXTS[5], "", None),
        ("qwen3", TEXTS[7], None, TEXTS[7]),
    ],
)
def test_split(parser: str, text: str, reasoning: str | None, content: str | None) -> None:
    assert split_reasoning(parser, text) == (reasoning, content)


@pytest.mark.parametrize("parser", PARSERS)
def test_streamed_pieces_add_up_to_the_whole_split(parser: str) -> None:
    rng = random.Random(5)
    for text in TEXTS:
        for _ in range(30):
            cuts = (
                sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if text else []
            )
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            stream = ReasoningStream(parser)
            got = [stream.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
            reasoning = "".join(r for r, _ in got)
            content = "".join(c for _, c in got)
            want_reasoning, want_content = split_reasoning(parser, text)
            assert (reasoning, content) == (want_reasoning or "", want_content or ""), (text, pieces)
            # a tag is never sent in pieces: no delta carries "<think>" or "</think>" as markup
            assert all("</think>" not in r for r, _ in got)


def test_chat_message_splits_before_it_looks_for_tool_calls() -> None:
    auto = ToolChoice("auto", names=["f"])
    text = '<think>call f</think><tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    message, finish = chat_message(auto, text, FinishReason.STOP, "deepseek_r1")
    assert finish == "tool_calls" and message["reasoning"] == "call f"
    assert message["tool_calls"][0]["function"]["name"] == "f"
    # all thinking, no answer: content is null, and there is no tool call to look for
    message, finish = chat_message(auto, "<think>still thinking", FinishReason.LENGTH, "qwen3")
    assert message == {"role": "assistant", "reasoning": "still thinking", "content": None}
    assert finish == "length"
    assert chat_message(None, "<think>a</think>b", FinishReason.STOP) == (
        {"role": "assistant", "content": "<think>a</think>b"},
        "stop",
    ), "no parser: the text as it is"


def test_chat_over_http_whole_and_streamed() -> None:
    text = "<think>why</think>because"
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": len(text)}

    async def scenario() -> None:
        scheduler = FakeScheduler([text])  # one character a step: tags arrive in pieces
        async with (
            serving(scheduler, reasoning_parser="deepseek_r1") as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            message = (await http.post("/v1/chat/completions", json=chat)).json()["choices"][0]["message"]
            assert (message["reasoning"], message["content"]) == ("why", "because")
            async with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as stream:
                chunks = [json.loads(x[6:]) async for x in stream.aiter_lines() if x.startswith("data: {")]
            deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
            assert "".join(d.get("reasoning", "") for d in deltas) == "why"
            assert "".join(d.get("content") or "" for d in deltas) == "because"
            assert not any("think>" in json.dumps(d) for d in deltas)
            completion = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": len(text)})
            assert completion.json()["choices"][0]["text"] == text, "completions keep the raw text"
            # a constrained chat cannot think aloud (its grammar starts at the first token): not split
            constrained = {**chat, "response_format": {"type": "json_object"}}
            message = (await http.post("/v1/chat/completions", json=constrained)).json()["choices"][0][
                "message"
            ]
            assert message["content"] == text and "reasoning" not in message

    run(scenario)
