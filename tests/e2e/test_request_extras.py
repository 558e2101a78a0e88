"""Request extras through the whole stack: logit_bias over HTTP and the gRPC SDK (+100 all but
forces a token, -100 bans one, greedy and seeded), include_stop_str_in_output and
truncate_prompt_tokens, allowed_token_ids and bad words, and a request they leave with no token
(it ends with EOS; -inf logprobs reach JSON as -9999.0); the pool checks out after each test
(conftest)."""

from __future__ import annotations

import json

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


def test_include_stop_str_and_truncate_prompt_tokens(stack: Stack, http: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = text[5:7]  # a stop string the greedy text is known to contain
    cut = http.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    kept = http.post("/v1/completions", json={**body, "stop": [stop], "include_stop_str_in_output": True})
    assert cut["finish_reason"] == "stop" and kept.json()["choices"][0]["text"] == cut["text"] + stop

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(stack.model).encode(PROMPT)
    last = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    truncated = http.post(
        "/v1/completions", json={"prompt": PROMPT, "truncate_prompt_tokens": 3, **last}
    ).json()
    direct = http.post("/v1/completions", json={"prompt": ids[-3:], **last}).json()
    assert truncated["usage"]["prompt_tokens"] == 3
    assert truncated["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]


def test_allowed_token_ids(stack: Stack, http: httpx.Client) -> None:
    plain = _ids(http)
    allowed = [t for t in (2024, 2025, 3000) if t not in plain]
    assert set(_ids(http, allowed_token_ids=allowed)) <= set(allowed)
    assert set(_ids(http, allowed_token_ids=allowed, temperature=1.0, seed=1)) <= set(allowed)
    with Client(stack.grpc_address, timeout=60) as client:
        result = client.generate(
            PROMPT, max_tokens=4, temperature=0, ignore_eos=True, allowed_token_ids=allowed
        )
        assert set(result.choices[0].token_ids) <= set(allowed)


def _strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_request_left_with_no_token_ends_with_eos_and_its_json_stays_valid(
    stack: Stack, http: httpx.Client
) -> None:
    plain = _ids(http)
    allowed = [t for t in (2024, 2025) if t not in plain]
    # more alternatives asked than allowed_token_ids leaves: the rest are -inf, written as -9999.0
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "allowed_token_ids": allowed}
    reply = http.post("/v1/completions", json={**body, "logprobs": 4})
    tops = _strict_json(reply.text)["choices"][0]["logprobs"]["top_logprobs"]
    assert all(-9999.0 in top.values() for top in tops), tops
    chat = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 4}
    with http.stream("POST", "/v1/chat/completions", json={**body, **chat, "stream": True}) as stream:
        lines = [line[6:] for line in stream.iter_lines() if line.startswith("data: {")]
    chunks = [_strict_json(line) for line in lines]
    floors = [
        t["logprob"]
        for c in chunks
        for choice in c["choices"]
        for entry in (choice.get("logprobs") or {}).get("content", [])
        for t in entry["top_logprobs"]
    ]
    assert floors.count(-9999.0) == 2 * 2, floors

    # every pair of allowed ids banned: after the first token nothing is left, so EOS ends it
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(stack.model).eos_token_id  # the model's EOS ids
    pairs = [[x, y] for x in allowed for y in allowed]
    with Client(stack.grpc_address, timeout=60) as client:
        result = client.generate(
            PROMPT,
            max_tokens=6,
            temperature=0,
            allowed_token_ids=allowed,
            bad_words_token_ids=pairs,
            logprobs=1,
        )
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and choice.token_ids[0] in allowed
    assert len(choice.token_ids) == 2 and choice.token_ids[1] in eos
    assert choice.logprobs[1].logprob == 0.0
    # what the gateway can see ahead is refused before anything is allocated
    reply = http.post("/v1/completions", json={**body, "min_tokens": 1, "stop_token_ids": allowed})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "min_tokens", reply.text


def test_tokens_as_token_ids_name_the_ids_the_choice_returned(http: httpx.Client) -> None:
    body = {"max_tokens": 4, "logprobs": 2, "return_tokens_as_token_ids": True}
    reply = http.post(
        "/v1/completions",
        json={"prompt": PROMPT, "temperature": 0, "ignore_eos": True, "return_token_ids": True, **body},
    )
    choice = reply.json()["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(
        len(top) == 2 and all(k.startswith("token_id:") for k in top)
        for top in choice["logprobs"]["top_logprobs"]
    )


def test_a_stop_token_is_in_the_ids_but_not_the_text_unless_asked(stack: Stack, http: httpx.Client) -> None:
    def completion(**extra) -> dict:
        body = {"prompt": PROMPT, "temperature": 0, "ignore_eos": True, "return_token_ids": True, **extra}
        return http.post("/v1/completions", json=body).json()["choices"][0]

    ids = completion(max_tokens=6)["token_ids"]
    k = next(i for i, t in enumerate(ids) if i >= 2 and t not in ids[:i])  # its first occurrence
    stopped = completion(max_tokens=6, stop_token_ids=[ids[k]])
    assert stopped["finish_reason"] == "stop" and stopped["token_ids"] == ids[: k + 1]
    assert stopped["text"] == completion(max_tokens=k)["text"]
    kept = completion(max_tokens=6, stop_token_ids=[ids[k]], include_stop_str_in_output=True)
    assert kept["text"] == completion(max_tokens=k + 1)["text"]


def test_bad_words_match_transformers_bad_words_ids(stack: Stack, http: httpx.Client) -> None:
    """Greedy with banned token sequences is token-identical to transformers' generate with the
    same bad_words_ids; a word given as text bans what the gateway tokenizes it into."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoTokenizer.from_pretrained(stack.model)
    model = AutoModelForCausalLM.from_pretrained(stack.model, torch_dtype=torch.float32).eval()
    prompt_ids = hf.encode(PROMPT)

    def transformers_greedy(bad_words_ids: list[list[int]]) -> list[int]:
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
            bad_words_ids=bad_words_ids, pad_token_id=hf.eos_token_id,
        )  # fmt: skip
        return out[0, len(prompt_ids) :].tolist()

    plain = _ids(http)
    assert plain == transformers_greedy(None)
    # one id: never sampled; two ids: the second is banned only right after the first (which the
    # prompt does not end with, where transformers would look too)
    assert prompt_ids[-1] != plain[2]
    for sequences in ([[plain[0]]], [[plain[2], plain[3]]]):
        with Client(stack.grpc_address, timeout=60) as client:
            result = client.generate(
                PROMPT, max_tokens=6, temperature=0, ignore_eos=True, bad_words_token_ids=sequences
            )
        banned = result.choices[0].token_ids
        # (no EOS either, so ignore_eos here and min_new_tokens there choose alike)
        assert banned == transformers_greedy(sequences) != plain and hf.eos_token_id not in banned
        if len(sequences[0]) == 2:
            assert banned[:3] == plain[:3], "the pair bans nothing before its first id is out"
    assert _ids(http, bad_words=[]) == plain

    # a word the plain output writes (as its own token)
    word = next(w for w in (hf.decode([t]).strip() for t in plain) if w.isalnum())
    texts = [word, " " + word]
    with_words = _ids(http, bad_words=[word])
    assert with_words != plain
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        runs = [with_words[i : i + len(ids)] for i in range(len(with_words) - len(ids) + 1)]
        assert ids not in runs, (text, ids, with_words)
    reply = http.post("/v1/completions", json={"prompt": PROMPT, "bad_words": ["x" * 257]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "bad_words"
