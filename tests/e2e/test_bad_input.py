"""Bad input through both APIs: the right status, a message naming the field and the limit,
and nothing allocated (the pool's used-block count, from Stats and from /metrics, unchanged)."""

from __future__ import annotations

import httpx
import pytest
from e2e_harness import MAX_MODEL_LEN, NUM_KV_BLOCKS, Stack, metric

from pagedserve.client import Client
from pagedserve.common import errors

CHAT = [{"role": "user", "content": "Square x."}]

# (name, path, body, HTTP status, param, words in the message)
HTTP_CASES = [
    ("max_tokens<1", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be >= 1"),
    ("temperature<0", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ("top_p=0", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("top_p>1", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("n<1", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "n must be >= 1"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-17"}, 404, "model", "gpt-17"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("empty ids", "/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("id outside vocab", "/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt", "vocabulary"),
    ("over max_model_len", "/v1/completions", {"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens",
     f"max_model_len={MAX_MODEL_LEN}"),
    ("long prompt", "/v1/completions", {"prompt": [5] * (MAX_MODEL_LEN - 10), "max_tokens": 11}, 400,
     "max_tokens", f"prompt ({MAX_MODEL_LEN - 10} tokens) + max_tokens (11)"),
    ("stop id outside vocab", "/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids",
     "outside the vocabulary"),
    ("logprobs>20", "/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", "[0, 20]"),
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("empty stop", "/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop", "empty"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages", "empty"),
    ("chat top_p", "/v1/chat/completions", {"messages": CHAT, "top_p": -1}, 400, "top_p", "(0, 1]"),
    ("chat unknown model", "/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, "model", "nope"),
    ("chat role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "robot"),
    # refused by the scheduler (the pool's size), not the gateway: the field comes back all the same
    ("n over the pool", "/v1/completions", {"prompt": "x", "n": 128, "max_tokens": 300}, 400, "n",
     f"the pool has {NUM_KV_BLOCKS}"),
]  # fmt: skip


def _used(stack: Stack, http: httpx.Client) -> tuple[int, float]:
    return stack.stats().blocks_used, metric(http.get("/metrics").text, "pagedserve_kv_blocks_used")


@pytest.mark.parametrize(
    ("name", "path", "body", "status", "param", "words"), HTTP_CASES, ids=[c[0] for c in HTTP_CASES]
)
def test_http_bad_input(stack: Stack, http: httpx.Client, name, path, body, status, param, words) -> None:
    before = _used(stack, http)
    reply = http.post(path, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param
    assert _used(stack, http) == before
    assert stack.stats().requests_waiting == 0


def test_http_body_that_is_not_json(stack: Stack, http: httpx.Client) -> None:
    reply = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


# (name, generate kwargs, error class, words in the message)
GRPC_CASES = [
    ("max_tokens<1", {"prompt": "x", "max_tokens": -1}, errors.InvalidArgument, "max_tokens"),  # 0 means unset
    ("temperature<0", {"prompt": "x", "temperature": -1.0}, errors.InvalidArgument, "temperature"),
    ("top_p>1", {"prompt": "x", "top_p": 2.0}, errors.InvalidArgument, "top_p"),
    ("n<1", {"prompt": "x", "n": -1}, errors.InvalidArgument, "n must be >= 1"),
    ("unknown model", {"prompt": "x", "model": "gpt-17"}, errors.NotFound, "gpt-17"),
    ("empty prompt", {"prompt": ""}, errors.InvalidArgument, "empty"),
    ("empty ids", {"token_ids": []}, errors.InvalidArgument, "empty"),
    ("over max_model_len", {"prompt": "x", "max_tokens": 10_000}, errors.InvalidArgument,
     f"max_model_len={MAX_MODEL_LEN}"),
    ("id outside vocab", {"token_ids": [1, 10**6]}, errors.InvalidArgument, "vocabulary"),
    ("no messages", {"messages": []}, errors.InvalidArgument, "empty"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs", "error", "words"), GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_bad_input(stack: Stack, http: httpx.Client, name, kwargs, error, words) -> None:
    before = _used(stack, http)
    prompt = kwargs.pop("prompt", None)
    with Client(stack.grpc_address, timeout=30) as client, pytest.raises(error) as info:
        client.generate(prompt, **kwargs)
    assert words in info.value.message
    with Client(stack.grpc_address, timeout=30) as client, pytest.raises(error):
        list(client.stream(prompt, **kwargs))
    assert _used(stack, http) == before
