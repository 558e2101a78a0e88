"""vLLM's `return_tokens_as_token_ids`: logprobs name each token (and each alternative)
"token_id:<id>" instead of its text, in both endpoints, whole and streamed; completions'
text_offset counts those names. The stand-in scheduler's tokens are code points."""

from __future__ import annotations

import json

import httpx
from gateway_fakes import FakeScheduler
from gateway_harness import run, serving

CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": True, "top_logprobs": 1}
TEXT = {"prompt": "x", "max_tokens": 2, "logprobs": 1}
NAMES = [f"token_id:{ord('o')}", f"token_id:{ord('k')}"]


def test_logprobs_name_tokens_by_id_when_asked() -> None:
    async def scenario() -> None:
        async with serving(FakeScheduler(["ok"])) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = {**TEXT, "return_tokens_as_token_ids": True}
            logprobs = (await http.post("/v1/completions", json=body)).json()["choices"][0]["logprobs"]
            assert logprobs["tokens"] == NAMES
            assert [list(top) for top in logprobs["top_logprobs"]] == [[n] for n in NAMES]
            assert logprobs["text_offset"] == [0, len(NAMES[0])]
            plain = (await http.post("/v1/completions", json=TEXT)).json()["choices"][0]["logprobs"]
            assert plain["tokens"] == ["o", "k"], "off by default"

            reply = await http.post("/v1/chat/completions", json={**CHAT, "return_tokens_as_token_ids": True})
            content = reply.json()["choices"][0]["logprobs"]["content"]
            assert [c["token"] for c in content] == NAMES
            assert [c["bytes"] for c in content] == [list(n.encode()) for n in NAMES]
            assert [c["top_logprobs"][0]["token"] for c in content] == NAMES

            streamed = {**CHAT, "return_tokens_as_token_ids": True, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=streamed) as stream:
                chunks = [json.loads(x[6:]) async for x in stream.aiter_lines() if x.startswith("data: {")]
            names = [
                c["token"]
                for chunk in chunks
                for choice in chunk["choices"]
                for c in (choice.get("logprobs") or {}).get("content", [])
            ]
            assert names == NAMES
            bad = await http.post("/v1/completions", json={**TEXT, "return_tokens_as_token_ids": "yes"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "return_tokens_as_token_ids"

    run(scenario)
