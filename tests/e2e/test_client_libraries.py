"""Client libraries people point at vLLM, unchanged, against the real services: LangChain's
`ChatOpenAI` and `OpenAI` (invoke, stream, batch), `litellm.completion` (whole and streamed)
and the `openai` package's completions with a prompt list and echo, and models.retrieve.

Every answer is greedy, so each must equal, character for character, what the gateway returns
for the same request sent directly; streamed chunks must be non-empty and join to that text.
Nothing reaches the internet: litellm reads its bundled model cost map
(LITELLM_LOCAL_MODEL_COST_MAP), and no path here counts tokens with tiktoken (which would
download an encoding).
"""

from __future__ import annotations

import os

import httpx
import openai
import pytest
from e2e_harness import Stack

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported, or it fetches it

QUESTION = "Write a Python function that returns the square of x."
PROMPTS = ["def square(x):", "class Stack:\n    def push(self, item):"]
MAX_TOKENS = 24


@pytest.fixture(autouse=True)
def no_tiktoken_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiktoken encoding lookup would download it: make any such call fail the test."""
    import tiktoken

    def refuse(*args, **kwargs):
        raise AssertionError(f"tiktoken encoding requested {args}: it would be downloaded")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    monkeypatch.setattr(tiktoken, "encoding_for_model", refuse)


def direct_chat(http: httpx.Client, content: str) -> str:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS, "temperature": 0}
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def direct_completion(http: httpx.Client, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def joined(chunks: list[str]) -> str:
    assert chunks and all(isinstance(c, str) for c in chunks)
    assert any(chunks), "some streamed chunk carries text"
    return "".join(chunks)


def test_langchain_chat_openai(stack: Stack, http: httpx.Client) -> None:
    from langchain_openai import ChatOpenAI

    want = direct_chat(http, QUESTION)
    assert want
    chat = ChatOpenAI(
        model=stack.model,
        base_url=f"{stack.http_url}/v1",
        api_key="unused",
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    reply = chat.invoke(QUESTION)
    assert reply.content == want
    assert reply.usage_metadata["output_tokens"] > 0
    assert joined([chunk.content for chunk in chat.stream(QUESTION)]) == want
    other = "Write a Python class for a stack."
    answers = chat.batch([QUESTION, other])
    assert [a.content for a in answers] == [want, direct_chat(http, other)]


def test_langchain_openai_completions_llm(stack: Stack, http: httpx.Client) -> None:
    from langchain_openai import OpenAI

    want = [direct_completion(http, p) for p in PROMPTS]
    assert all(want)
    llm = OpenAI(
        model=stack.model,
        base_url=f"{stack.http_url}/v1",
        api_key="unused",
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    assert llm.invoke(PROMPTS[0]) == want[0]
    assert joined(list(llm.stream(PROMPTS[0]))) == want[0]
    # batch() sends the prompts as one request with a list of prompts
    assert llm.batch(PROMPTS) == want


def test_litellm_completion(stack: Stack, http: httpx.Client) -> None:
    import litellm

    want = direct_chat(http, QUESTION)
    common = {
        "model": f"openai/{stack.model}",
        "api_base": f"{stack.http_url}/v1",
        "api_key": "unused",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    whole = litellm.completion(**common)
    assert whole.choices[0].message.content == want
    assert whole.usage.completion_tokens > 0
    streamed = [
        chunk.choices[0].delta.content or ""
        for chunk in litellm.completion(**common, stream=True)
        if chunk.choices
    ]
    assert joined(streamed) == want


def test_openai_completions_with_a_prompt_list_echo_and_models_retrieve(
    stack: Stack, http: httpx.Client
) -> None:
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    card = client.models.retrieve(stack.model)
    assert card.id == stack.model and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-served")
    want = [direct_completion(http, p) for p in PROMPTS]
    batch = client.completions.create(
        model=stack.model, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0, echo=True
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [p + w for p, w in zip(PROMPTS, want, strict=True)]
