"""logit_bias through the whole stack (HTTP and the gRPC SDK): +100 all but forces a token,
-100 bans one, greedy and seeded; the pool checks out after each test (conftest)."""

from __future__ import annotations

import httpx
from e2e_harness import Stack

from pagedserve.client import Client

PROMPT = "def fib(n):\n    "


def _ids(http: httpx.Client, **body) -> list[int]:
    body = {
        "prompt": PROMPT,
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        **body,
    }
    reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["token_ids"]


def test_plus_100_forces_a_token_and_minus_100_bans_one(stack: Stack, http: httpx.Client) -> None:
    plain = _ids(http)
    forced = 2024 if plain[0] != 2024 else 2025
    assert _ids(http, logit_bias={str(forced): 100}) == [forced] * 6
    # seeded sampling too: the biased token's probability is all but 1
    assert _ids(http, logit_bias={str(forced): 100}, temperature=1.0, seed=3) == [forced] * 6
    banned = _ids(http, logit_bias={str(plain[0]): -100})
    assert plain[0] not in banned
    # a bias of 0 changes nothing
    assert _ids(http, logit_bias={str(plain[0]): 0}) == plain
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    reply = http.post(
        "/v1/chat/completions", json={**chat, "logit_bias": {str(forced): 100}, "return_token_ids": True}
    )
    assert reply.json()["choices"][0]["token_ids"] == [forced] * 3

    with Client(stack.grpc_address, timeout=60) as client:
        result = client.generate(
            PROMPT, max_tokens=4, temperature=0, ignore_eos=True, logit_bias={forced: 100}
        )
        assert result.choices[0].token_ids == [forced] * 4
