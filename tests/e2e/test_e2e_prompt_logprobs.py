"""Prompt log-probabilities against the real services: OpenAI's echo + logprobs (the `openai`
client), vLLM's `prompt_logprobs` on completions and chat, and the SDK's `prompt_logprobs`;
values equal transformers' dense forward on the bundled model; limits are 400s naming the field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from e2e_harness import Stack
from hf_reference import reference_prompt_logprobs

from pagedserve.client import Client
from pagedserve.common import errors

PROMPT = "def square(x):\n    return"
TOL = 1e-4


def prompt_ids(http: httpx.Client, stack: Stack) -> list[int]:
    body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "return_token_ids": True}
    return http.post("/v1/completions", json=body).json()["choices"][0]["prompt_token_ids"]


def test_echo_with_logprobs_with_the_openai_client(stack: Stack, http: httpx.Client) -> None:
    ids = prompt_ids(http, stack)
    want = reference_prompt_logprobs(stack.model, ids)  # [P - 1, V]
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    plain = client.completions.create(
        model=stack.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2
    ).choices[0]
    echoed = client.completions.create(
        model=stack.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, echo=True
    ).choices[0]
    assert echoed.text == PROMPT + plain.text
    lp = echoed.logprobs
    num_prompt = len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "nothing comes before the first"
    got = torch.tensor(lp.token_logprobs[1:num_prompt])
    chosen = want.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert torch.allclose(got, chosen, atol=TOL, rtol=0), (got - chosen).abs().max()
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert lp.tokens[num_prompt:] == plain.logprobs.tokens, "the completion's logprobs follow"
    assert lp.token_logprobs[num_prompt:] == pytest.approx(plain.logprobs.token_logprobs, abs=TOL)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens[1:num_prompt]) in PROMPT  # token strings (the first may be BOS)

    streamed = list(
        client.completions.create(
            model=stack.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, echo=True, stream=True
        )
    )
    first = streamed[0].choices[0].logprobs
    assert first.token_logprobs[:num_prompt] == lp.token_logprobs[:num_prompt]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.text


def test_vllm_prompt_logprobs_on_completions_and_chat(stack: Stack, http: httpx.Client) -> None:
    ids = prompt_ids(http, stack)
    want = reference_prompt_logprobs(stack.model, ids)
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "prompt_logprobs": 3, "n": 2}
    reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"]
    entries = choices[0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    top_values, top_ids = want.topk(3, dim=-1)
    for i, entry in enumerate(entries[1:]):
        own = entry[str(ids[i + 1])]
        own_value = want[i, ids[i + 1]]
        assert own["logprob"] == pytest.approx(own_value.item(), abs=TOL)
        if ((want[i] - own_value).abs() < 1e-3).sum() == 1:  # no near-tie: the rank is exact
            assert own["rank"] == (want[i] > own_value).sum().item() + 1
        ranked = sorted(entry.values(), key=lambda v: v["rank"])
        assert len(ranked) >= 3 and [v["rank"] for v in ranked[:3]] == [1, 2, 3]
        assert [v["logprob"] for v in ranked[:3]] == pytest.approx(top_values[i].tolist(), abs=TOL)
        if top_values[i, 0] - top_values[i, 1] > 1e-3:
            assert entry[str(top_ids[i, 0].item())]["rank"] == 1
        assert all(isinstance(v["decoded_token"], str) for v in entry.values())
    assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, "computed, not cached"

    chat = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 0},
    )
    assert chat.status_code == 200, chat.text
    chat_entries = chat.json()["prompt_logprobs"]
    assert chat_entries[0] is None and len(chat_entries) == chat.json()["usage"]["prompt_tokens"]
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in chat_entries[1:])


@pytest.mark.parametrize(
    ("path", "extra", "words", "field"),
    [
        (
            "/v1/completions",
            {"prompt_logprobs": 21},
            "prompt_logprobs must be in [0, 20], got 21",
            "prompt_logprobs",
        ),
        (
            "/v1/completions",
            {"echo": True, "logprobs": 21},
            "logprobs must be in [0, 20], got 21",
            "logprobs",
        ),
        (
            "/v1/completions",
            {"prompt_logprobs": 1, "stream": True},
            "not available when stream",
            "prompt_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"prompt_logprobs": 99},
            "prompt_logprobs must be in [0, 20]",
            "prompt_logprobs",
        ),
    ],
)
def test_prompt_logprobs_limits(stack: Stack, http: httpx.Client, path, extra, words, field) -> None:
    body = (
        {"prompt": PROMPT}
        if "completions" in path and "chat" not in path
        else {"messages": [{"role": "user", "content": "x"}]}
    )
    reply = http.post(path, json={**body, **extra})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["param"] == field, json.dumps(error)


def test_prompt_logprobs_with_the_sdk(stack: Stack, http: httpx.Client) -> None:
    ids = prompt_ids(http, stack)
    want = reference_prompt_logprobs(stack.model, ids)
    with Client(stack.grpc_address, timeout=60) as client:
        result = client.generate(token_ids=ids, max_tokens=2, temperature=0, prompt_logprobs=4)
        assert [lp.token_id for lp in result.prompt_logprobs] == ids[1:]
        got = torch.tensor([lp.logprob for lp in result.prompt_logprobs])
        chosen = want.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        assert torch.allclose(got, chosen, atol=TOL, rtol=0)
        assert all(len(lp.top) == 4 and lp.rank >= 1 for lp in result.prompt_logprobs)
        deltas = list(client.stream(token_ids=ids, max_tokens=2, temperature=0, prompt_logprobs=4))
        assert [lp.token_id for lp in deltas[0].prompt_logprobs] == ids[1:]
        assert all(d.prompt_logprobs == [] for d in deltas[1:])
        with pytest.raises(errors.InvalidArgument, match="prompt_logprobs"):
            client.generate(token_ids=ids, max_tokens=2, prompt_logprobs=21)
