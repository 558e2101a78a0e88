"""The gateway's other endpoints: models, health, readiness, Prometheus metrics, and tokenizing
over HTTP and gRPC."""

from __future__ import annotations

import httpx
import pytest
from e2e_harness import MAX_MODEL_LEN, NUM_KV_BLOCKS, Stack, metric

from pagedserve.client import Client
from pagedserve.common.errors import InvalidArgument, NotFound

METRICS = [
    "pagedserve_kv_blocks_total",
    "pagedserve_kv_blocks_used",
    "pagedserve_kv_blocks_cached",
    "pagedserve_requests_running",
    "pagedserve_requests_waiting",
    "pagedserve_prefix_cache_hit_tokens_total",
    "pagedserve_prefix_cache_query_tokens_total",
    "pagedserve_preemptions_total",
    "pagedserve_generated_tokens_total",
]


def test_models_health_ready(stack: Stack, http: httpx.Client) -> None:
    name = stack.model  # served under --model as given, as vLLM does
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(name, MAX_MODEL_LEN)]
    with Client(stack.grpc_address, timeout=10) as client:
        assert [(m.id, m.max_model_len) for m in client.models()] == [(name, MAX_MODEL_LEN)]
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"tokenizer": True, "scheduler": True}


def test_metrics_mirror_stats_and_time_requests(stack: Stack, http: httpx.Client) -> None:
    before = http.get("/metrics").text
    generated = metric(before, "pagedserve_generated_tokens_total")
    ttft = metric(before, "pagedserve_time_to_first_token_seconds_count")
    code = (
        'def area(width, height):\n    """Return the area of a rectangle."""\n    return width * height\n\n\n'
    )
    prompt = {"prompt": code * 2, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    for _ in range(2):  # the second run hits the prefix cache (the prompt spans full blocks)
        assert http.post("/v1/completions", json=prompt).status_code == 200
    text = http.get("/metrics").text
    for name in METRICS:
        metric(text, name)
    assert metric(text, "pagedserve_kv_blocks_total") == NUM_KV_BLOCKS
    assert metric(text, "pagedserve_generated_tokens_total") >= generated + 16
    assert metric(text, "pagedserve_prefix_cache_hit_tokens_total") > 0
    assert metric(text, "pagedserve_time_to_first_token_seconds_count") == ttft + 2
    assert metric(text, "pagedserve_time_per_output_token_seconds_count") > 0
    assert metric(text, "pagedserve_scheduler_up") == 1


def test_tokenize_counts_as_a_request_would_and_detokenize_inverts_it(
    stack: Stack, http: httpx.Client
) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(stack.model)
    text = "def add(a, b):\n    return a + b  # café ✓"
    reply = http.post("/tokenize", json={"prompt": text})
    assert reply.status_code == 200, reply.text
    tokens = reply.json()["tokens"]
    assert tokens == hf.encode(text) and reply.json()["count"] == len(tokens)
    assert reply.json()["max_model_len"] == MAX_MODEL_LEN and reply.json()["token_strs"] is None
    spelled = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert spelled["tokens"] == tokens and spelled["token_strs"] == hf.convert_ids_to_tokens(tokens)
    completion = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
    assert completion.json()["usage"]["prompt_tokens"] == len(tokens)

    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sum two ints."}]
    chat_count = http.post("/tokenize", json={"messages": messages}).json()["count"]
    chat = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == chat_count

    back = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert back == hf.decode(tokens)
    skipped = http.post("/detokenize", json={"tokens": tokens, "skip_special_tokens": True}).json()["prompt"]
    assert skipped == hf.decode(tokens, skip_special_tokens=True)
    too_big = http.post("/detokenize", json={"tokens": [len(hf)]})
    assert too_big.status_code == 400 and "outside the vocabulary" in too_big.json()["error"]["message"]


def test_the_sdk_tokenizes_and_detokenizes_over_grpc(stack: Stack, http: httpx.Client) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(stack.model)
    text = "class Stack:\n    pass"
    messages = [{"role": "user", "content": "Reverse a list."}]
    with Client(stack.grpc_address, timeout=30) as client:
        tokenized = client.tokenize(text)
        assert tokenized.token_ids == hf.encode(text) and tokenized.max_model_len == MAX_MODEL_LEN
        assert tokenized.token_strs is None
        spelled = client.tokenize(messages=messages, return_token_strs=True)
        assert spelled.token_strs == hf.convert_ids_to_tokens(spelled.token_ids) != []
        plain = client.tokenize(text, add_special_tokens=False).token_ids
        assert plain == hf.encode(text, add_special_tokens=False)
        chat = client.tokenize(messages=messages).token_ids
        assert len(chat) == http.post("/tokenize", json={"messages": messages}).json()["count"]
        assert len(chat) == client.generate(messages=messages, max_tokens=1).usage.prompt_tokens
        assert client.detokenize(chat) == hf.decode(chat)
        assert client.detokenize(chat, skip_special_tokens=True) == hf.decode(chat, skip_special_tokens=True)
        with pytest.raises(InvalidArgument, match=f"token_ids token id {len(hf)} is outside the vocabulary"):
            client.detokenize([5, len(hf)])
        with pytest.raises(
            InvalidArgument, match=f"token_ids has {MAX_MODEL_LEN + 1} ids, more than max_model_len"
        ):
            client.detokenize([5] * (MAX_MODEL_LEN + 1))
        with pytest.raises(NotFound, match="model 'gpt-4' is not served here") as info:
            client.tokenize(text, model="gpt-4")
        assert info.value.field == "model"
        # a field the tokenizer service names reaches the SDK as the client's
        with pytest.raises(InvalidArgument, match="robot") as info:
            client.tokenize(messages=[{"role": "robot", "content": "hi"}])
        assert info.value.field == "messages"
        with pytest.raises(TypeError, match="exactly one of prompt or messages"):
            client.tokenize()


def test_chat_template_options_reach_the_template(stack: Stack, http: httpx.Client) -> None:
    """continue_final_message renders the last message open, as transformers does, and the model
    continues it; chat_template_kwargs reach the template (the bundled one reads none of them)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(stack.model)
    messages = [{"role": "user", "content": "Write f."}, {"role": "assistant", "content": "def f("}]
    expected = hf.encode(
        hf.apply_chat_template(messages, tokenize=False, continue_final_message=True),
        add_special_tokens=False,
    )
    body = {"messages": messages, "continue_final_message": True}
    assert http.post("/tokenize", json=body).json()["tokens"] == expected
    chat = http.post("/v1/chat/completions", json={**body, "max_tokens": 6, "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len(expected)
    same_ids = http.post("/v1/completions", json={"prompt": expected, "max_tokens": 6, "temperature": 0})
    assert chat.json()["choices"][0]["message"]["content"] == same_ids.json()["choices"][0]["text"]
    with Client(stack.grpc_address, timeout=30) as client:
        assert client.tokenize(messages=messages, continue_final_message=True).token_ids == expected
        plain = client.tokenize(messages=messages[:1]).token_ids
        assert (
            client.tokenize(messages=messages[:1], chat_template_kwargs={"enable_thinking": False}).token_ids
            == plain
        )
    refused = http.post(
        "/v1/chat/completions", json={**body, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template_kwargs"
