"""The official `openai` package against the real stack: a list of prompts (choices numbered as
OpenAI does, the same texts as one prompt at a time, streamed or whole) and echo."""

from __future__ import annotations

import openai
import pytest
from e2e_harness import Stack


def test_a_list_of_prompts_with_the_openai_client(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    prompts = ["def square(x):", "class Stack:"]
    batch = client.completions.create(
        model=stack.model, prompt=prompts, n=2, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    singles = [
        client.completions.create(
            model=stack.model, prompt=p, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for p in prompts
    ]
    assert [c.text for c in batch.choices] == [singles[0], singles[0], singles[1], singles[1]]
    assert batch.usage.completion_tokens == 24
    ids = client.completions.create(model=stack.model, prompt=[[1, 5, 6], [1, 7]], max_tokens=2)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5

    streamed: dict[int, str] = {}
    for chunk in client.completions.create(
        model=stack.model,
        prompt=prompts,
        n=2,
        max_tokens=6,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in batch.choices}


def test_echo_with_the_openai_client(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    plain = client.completions.create(model=stack.model, prompt="def square(x):", max_tokens=6, temperature=0)
    echoed = client.completions.create(
        model=stack.model, prompt=["def square(x):", [1, 5, 6]], max_tokens=6, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "def square(x):" + plain.choices[0].text
    ids_text = echoed.choices[1].text
    assert ids_text and echoed.usage.prompt_tokens == plain.usage.prompt_tokens + 3
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=stack.model, prompt="def square(x):", max_tokens=6, temperature=0, echo=True, stream=True
        )
        if c.choices
    )
    assert streamed == echoed.choices[0].text
    with pytest.raises(openai.BadRequestError, match=r"logprobs must be in \[0, 20\], got 21"):
        client.completions.create(model=stack.model, prompt="x", echo=True, logprobs=21)
