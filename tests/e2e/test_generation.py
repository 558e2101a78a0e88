"""Generation through the whole stack (four processes, real Redis): exact where it can be.

Greedy outputs must be token-identical to transformers' `generate` on the same weights,
through both public APIs at once, for the bundled Llama and for a random-weight Qwen2.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from e2e_harness import Stack, hf_greedy, metric, running_stack
from transformers import AutoTokenizer

from pagedserve.client import AsyncClient, Client
from pagedserve.gateway.sse import parse_sse

NEW_TOKENS = 64

# Prompts of mixed lengths (a few tokens to a few hundred characters of code).
SNIPPETS = [
    "def ",
    "import os\n",
    "class Stack:\n    def __init__(self):\n",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "for i in range(10):\n    print(i)\n",
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n\n\ndef save(",
    "x = [1, 2, 3]\ny = ",
    "# Sort a list of words by length, then alphabetically.\nwords = ['pear', 'fig', 'apple']\n",
    "async def fetch(session, url):\n    async with session.get(url) as response:\n",
    "try:\n    value = int(text)\nexcept ValueError:\n",
    'def area(width, height):\n    """Return the area of a rectangle."""\n    return width * height\n\n\ndef ',
    "from collections import defaultdict\n\ncounts = defaultdict(int)\nfor word in text.split():\n",
    "if __name__ == '__main__':\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def __repr__(self):\n",
    "with open('data.txt') as f:\n    for line in f:\n        line = line.strip()\n        if not line:\n",
    "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n",
]


async def _greedy_both_apis(
    stack: Stack, prompts: list[list[int]]
) -> tuple[list[list[int]], list[list[int]]]:
    """The 16 prompts through gRPC (as text/ids alternately) and HTTP, all 32 at the same time.

    `prompts[i]` are the ids of SNIPPETS[i]; text prompts are checked to tokenize to them."""
    tokenizer = AutoTokenizer.from_pretrained(stack.model)

    async def over_grpc(client: AsyncClient, i: int) -> list[int]:
        if i % 2 == 0:
            result = await client.generate(SNIPPETS[i], max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        else:
            result = await client.generate(
                token_ids=prompts[i], max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True
            )
        assert result.usage.prompt_tokens == len(prompts[i])
        assert result.usage.completion_tokens == NEW_TOKENS
        return result.choices[0].token_ids

    async def over_http(client: httpx.AsyncClient, i: int) -> list[int]:
        prompt = prompts[i] if i % 2 == 0 else SNIPPETS[i]
        body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        reply = await client.post("/v1/completions", json={**body, "return_token_ids": True})
        assert reply.status_code == 200, reply.text
        (choice,) = reply.json()["choices"]
        assert choice["prompt_token_ids"] == prompts[i]
        assert choice["finish_reason"] == "length"
        assert choice["text"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=True)
        return choice["token_ids"]

    async with AsyncClient(stack.grpc_address, timeout=300) as grpc_client:
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=300) as http_client:
            results = await asyncio.gather(
                *(over_grpc(grpc_client, i) for i in range(len(prompts))),
                *(over_http(http_client, i) for i in range(len(prompts))),
            )
    return results[: len(prompts)], results[len(prompts) :]


def _prompt_ids(model: str) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model)
    return [tokenizer(text)["input_ids"] for text in SNIPPETS]


def test_greedy_matches_transformers_bundled(stack: Stack) -> None:
    prompts = _prompt_ids(stack.model)
    assert len({len(p) for p in prompts}) > 8, "mixed prompt lengths"
    assert max(map(len, prompts)) + NEW_TOKENS <= stack.stats().max_model_len
    grpc_out, http_out = asyncio.run(_greedy_both_apis(stack, prompts))
    expected = hf_greedy(stack.model, prompts, NEW_TOKENS)
    for i, want in enumerate(expected):
        assert grpc_out[i] == want, f"gRPC prompt {i}"
        assert http_out[i] == want, f"HTTP prompt {i}"


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: str) -> str:
    """A random-weight Qwen2 (q/k/v biases, GQA) with a copy of the bundled tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen2-random")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(bundled_model_path) / name).exists():
            shutil.copy(Path(bundled_model_path) / name, path / name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.1,  # peaked logits: greedy choices are not near-ties
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(path)
    return str(path)


def test_greedy_matches_transformers_random_qwen2(qwen2_model: str, fresh_redis_url, tmp_path: Path) -> None:
    prompts = _prompt_ids(qwen2_model)
    with running_stack(qwen2_model, fresh_redis_url(), tmp_path) as qwen_stack:
        grpc_out, http_out = asyncio.run(_greedy_both_apis(qwen_stack, prompts))
        with Client(qwen_stack.grpc_address, timeout=30) as client:
            assert [m.id for m in client.models()] == [qwen2_model]
    expected = hf_greedy(qwen2_model, prompts, NEW_TOKENS)
    for i, want in enumerate(expected):
        assert grpc_out[i] == want, f"gRPC prompt {i}"
        assert http_out[i] == want, f"HTTP prompt {i}"


def test_64_concurrent_streams_complete(stack: Stack) -> None:
    """Half SSE over HTTP, half gRPC streams; every one ends with its finish reason and usage."""
    max_tokens = 12

    async def sse(client: httpx.AsyncClient, i: int) -> str:
        body = {
            "prompt": SNIPPETS[i % len(SNIPPETS)],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "seed": i,
            "stream": True,
            # every other one with the running usage in each chunk
            "stream_options": {"include_usage": True, "continuous_usage_stats": i % 2 == 1},
        }
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            events = parse_sse((await reply.aread()).decode())
        assert events[-1] == "[DONE]"
        usage = events[-2]["usage"]
        assert events[-2]["choices"] == [] and 1 <= usage["completion_tokens"] <= max_tokens
        running = [e["usage"] for e in events[:-2]]
        if i % 2:
            # it counts what the final usage counts, by the last chunk with choices
            assert running[-1]["prompt_tokens"] == usage["prompt_tokens"] > 0
            assert running[-1]["completion_tokens"] == usage["completion_tokens"]
            completions = [u["completion_tokens"] for u in running]
            assert completions == sorted(completions) and completions[0] >= 1
        else:
            assert running == [None] * len(running)
        finishes = [c["finish_reason"] for e in events[:-2] for c in e["choices"] if c["finish_reason"]]
        assert finishes in (["length"], ["stop"])
        return "".join(c["text"] for e in events[:-2] for c in e["choices"])

    async def stream(client: AsyncClient, i: int) -> str:
        text, finishes, usage = "", [], None
        async for delta in client.stream(
            SNIPPETS[i % len(SNIPPETS)], max_tokens=max_tokens, temperature=0.7, seed=i
        ):
            for choice in delta.choices:
                text += choice.text
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
            usage = delta.usage or usage
        assert finishes in (["length"], ["stop"]) and usage is not None
        return text

    async def run() -> list[str]:
        async with AsyncClient(stack.grpc_address, timeout=300) as grpc_client:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=stack.http_url, timeout=300, limits=limits) as http_client:
                return await asyncio.gather(
                    *(sse(http_client, i) for i in range(32)), *(stream(grpc_client, i) for i in range(32))
                )

    before = http_metrics(stack)
    texts = asyncio.run(run())
    after = http_metrics(stack)
    assert len(texts) == 64
    # Detokenized in the gateway itself: no Detokenize stream to the tokenizer service, and
    # every token of every choice went through the local detokenizer.
    assert metric(after, "pagedserve_gateway_detokenize_streams_total") == 0
    items = metric(after, "pagedserve_gateway_detokenize_items_total") - metric(
        before, "pagedserve_gateway_detokenize_items_total"
    )
    assert items >= 64 * 2, f"{items} items"
    # Same seed and prompt through either API: the same sample.
    assert texts[:32] == texts[32:]


def http_metrics(stack: Stack) -> str:
    return httpx.get(f"{stack.http_url}/metrics", timeout=10).text


def test_n4_returns_four_choices(stack: Stack, http: httpx.Client) -> None:
    reply = http.post(
        "/v1/completions",
        json={
            "prompt": "def ",
            "n": 4,
            "max_tokens": 16,
            "temperature": 1.0,
            "seed": 7,
            "return_token_ids": True,
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in body["choices"])
    assert len({tuple(c["token_ids"]) for c in body["choices"]}) > 1, "four samples, not one copied"
    with Client(stack.grpc_address, timeout=60) as client:
        result = client.generate("def ", n=4, max_tokens=16, temperature=1.0, seed=7)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert [c.token_ids for c in result.choices] == [c["token_ids"] for c in body["choices"]]


def test_seeded_sampling_is_reproducible(stack: Stack, http: httpx.Client) -> None:
    body = {"prompt": "import ", "max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "return_token_ids": True}
    runs = [
        http.post("/v1/completions", json={**body, "seed": seed}).json()["choices"][0] for seed in (1, 1, 2)
    ]
    assert runs[0]["token_ids"] == runs[1]["token_ids"] and runs[0]["text"] == runs[1]["text"]
    assert runs[0]["token_ids"] != runs[2]["token_ids"], "another seed, another sample"


def _token_texts(model: str, token_ids: list[int]) -> list[str]:
    """The text each token adds (prefix decodes), to place stop strings across token boundaries."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts, previous = [], ""
    for i in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:i], skip_special_tokens=True)
        texts.append(text[len(previous) :])
        previous = text
    return texts


def test_stop_string_across_token_boundaries(stack: Stack, http: httpx.Client) -> None:
    base = {"prompt": "def fibonacci(n):\n", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    full = http.post("/v1/completions", json={**base, "return_token_ids": True}).json()["choices"][0]
    pieces = _token_texts(stack.model, full["token_ids"])
    assert "".join(pieces) == full["text"]
    # A stop string made of the last character of token k and the first of token k+1, in the middle.
    k = next(i for i in range(len(pieces) // 3, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    boundary = sum(len(p) for p in pieces[: k + 1])
    stop = full["text"][boundary - 1 : boundary + 1]
    cut = full["text"].find(stop)
    expected = full["text"][:cut]
    assert len(stop) == 2 and cut >= 0

    plain = http.post("/v1/completions", json={**base, "stop": [stop, "never-there"]}).json()
    assert plain["choices"][0]["text"] == expected
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert plain["usage"]["completion_tokens"] < 48

    streamed = http.post("/v1/completions", json={**base, "stop": stop, "stream": True})
    events = parse_sse(streamed.text)
    assert events[-1] == "[DONE]"
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == expected
    assert [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]] == ["stop"]

    with Client(stack.grpc_address, timeout=60) as client:
        result = client.generate(
            "def fibonacci(n):\n", max_tokens=48, temperature=0, ignore_eos=True, stop=[stop]
        )
        assert result.choices[0].text == expected and result.choices[0].finish_reason == "stop"
        assert result.choices[0].token_ids == full["token_ids"][: len(result.choices[0].token_ids)]


CHAT = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Write a Python function: Return the square of x."},
]


def test_chat_completions_with_the_openai_client(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    name = stack.model  # served under --model as given, as vLLM does
    assert [m.id for m in client.models.list().data] == [name]

    whole = client.chat.completions.create(model=name, messages=CHAT, max_tokens=40, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == name
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 40
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=CHAT,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content, "streamed and whole answers agree (greedy)"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])

    # The gRPC chat form renders the same template.
    with Client(stack.grpc_address, timeout=60) as grpc_client:
        result = grpc_client.generate(messages=CHAT, max_tokens=40, temperature=0)
    assert result.choices[0].text == choice.message.content
    assert result.usage.prompt_tokens == whole.usage.prompt_tokens


def test_model_may_be_omitted_and_chat_fills_the_context(stack: Stack, http: httpx.Client) -> None:
    reply = http.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    max_len = stack.stats().max_model_len
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == max_len


def test_logprobs_pass_through(stack: Stack, http: httpx.Client) -> None:
    body = {"prompt": "import ", "max_tokens": 5, "temperature": 0, "logprobs": 2, "return_token_ids": True}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 5
    assert "".join(logprobs["tokens"]) == choice["text"]
    for lp, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert lp <= 0 and len(top) >= 1
        assert max(top.values()) == pytest.approx(lp, abs=1e-5), "greedy: the sampled token is the top one"
    with Client(stack.grpc_address, timeout=60) as client:
        result = client.generate("import ", max_tokens=5, temperature=0, logprobs=2)
    assert [lp.token_id for lp in result.choices[0].logprobs] == choice["token_ids"]
    assert all(len(lp.top) == 2 for lp in result.choices[0].logprobs)


def test_vllm_extras_reach_the_sampler(stack: Stack, http: httpx.Client) -> None:
    base = {"prompt": "def fibonacci(n):\n", "max_tokens": 24, "ignore_eos": True, "return_token_ids": True}
    greedy = http.post("/v1/completions", json={**base, "temperature": 0}).json()["choices"][0]["token_ids"]
    top_k_1 = http.post("/v1/completions", json={**base, "temperature": 1.5, "top_k": 1, "seed": 3}).json()
    assert top_k_1["choices"][0]["token_ids"] == greedy, "top_k=1 is greedy whatever the temperature"
    min_p_1 = http.post("/v1/completions", json={**base, "temperature": 1.5, "min_p": 1.0, "seed": 3}).json()
    assert min_p_1["choices"][0]["token_ids"] == greedy, "min_p=1 keeps only the top token"

    stop_id = greedy[10]
    first = greedy.index(stop_id)
    body = {**base, "temperature": 0, "ignore_eos": False, "stop_token_ids": [stop_id]}
    stopped = http.post("/v1/completions", json=body).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["token_ids"] == greedy[: first + 1]

    penalized = http.post(
        "/v1/completions", json={**base, "temperature": 0, "repetition_penalty": 2.0}
    ).json()
    assert penalized["choices"][0]["token_ids"] != greedy, "a strong repetition penalty changes greedy output"
