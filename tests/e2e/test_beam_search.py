"""Beam search through the whole stack (four processes, real Redis), against transformers.

`use_beam_search` with n beams over HTTP (/v1/completions, /v1/chat/completions) and gRPC (the
SDK, unary and streaming): the beams, their order, token ids and finish reasons equal
transformers' `generate(num_beams=n, num_return_sequences=n)` on the bundled model; scores to
1e-4 (or 1e-5 relative). While a beam request runs, the pool holds fewer blocks than n copies of its prompt would.
Bad combinations are refused with the field named. After each test the harness checks that
the pool is idle, fsck is clean and Redis equals the scheduler's view.
"""

from __future__ import annotations

import asyncio
import math
import threading

import grpc
import httpx
import pytest
from e2e_harness import BLOCK_SIZE, Stack
from hf_reference import reference_beams
from transformers import AutoTokenizer

from pagedserve.client import AsyncClient, Client
from pagedserve.common.errors import InvalidArgument
from pagedserve.v1 import gateway_pb2, gateway_pb2_grpc

TOLERANCE = 1e-4
PROMPT = "def fibonacci(n):\n    "
LONG_PROMPT = (
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n\n\n"
    "def save(path, data):\n    with open(path, 'w') as f:\n        json.dump(data, f)\n\n\n"
    "class Store:\n    def __init__(self, path):\n        self.path = path\n\n    def get(self, key):\n"
)


def _ids(stack: Stack, text: str) -> list[int]:
    return AutoTokenizer.from_pretrained(stack.model)(text)["input_ids"]


def _want(stack: Stack, prompt: list[int], n: int, max_tokens: int, **kw) -> list[tuple[list[int], float]]:
    eos = list(stack.stats().eos_token_ids)
    return reference_beams(stack.model, prompt, n, max_tokens, eos_token_id=eos, **kw)


def _check_choices(choices: list[dict], want, length_penalty: float) -> None:
    assert [c["index"] for c in choices] == list(range(len(want)))
    assert [c["token_ids"] for c in choices] == [tokens for tokens, _ in want]
    for c, (tokens, score) in zip(choices, want, strict=True):
        assert c["beam_score"] == pytest.approx(score, rel=1e-5, abs=TOLERANCE)
        assert c["beam_score"] == pytest.approx(c["cumulative_logprob"] / len(tokens) ** length_penalty)
    scores = [c["beam_score"] for c in choices]
    assert scores == sorted(scores, reverse=True)  # best first


def test_http_completions_beams_equal_transformers(stack: Stack, http: httpx.Client) -> None:
    prompt = _ids(stack, PROMPT)
    for n, max_tokens, lp, es in ((4, 12, 1.5, "never"), (3, 8, 1.0, True), (2, 10, 0.5, False)):
        body = {
            "prompt": prompt, "max_tokens": max_tokens, "n": n, "use_beam_search": True,
            "length_penalty": lp, "early_stopping": es, "return_token_ids": True,
        }  # fmt: skip
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        choices = reply.json()["choices"]
        want = _want(stack, prompt, n, max_tokens, length_penalty=lp, early_stopping=es)
        _check_choices(choices, want, lp)
        eos = set(stack.stats().eos_token_ids)
        for c, (tokens, _) in zip(choices, want, strict=True):
            assert c["finish_reason"] == ("stop" if tokens[-1] in eos else "length")
        usage = reply.json()["usage"]
        assert usage["completion_tokens"] == sum(len(t) for t, _ in want)


def test_http_chat_beams_equal_transformers(stack: Stack, http: httpx.Client) -> None:
    body = {
        "messages": [{"role": "user", "content": "Write a function that adds two numbers."}],
        "max_tokens": 10, "n": 3, "use_beam_search": True, "return_token_ids": True,
    }  # fmt: skip
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    want = _want(stack, choices[0]["prompt_token_ids"], 3, 10)
    _check_choices(choices, want, 1.0)
    tokenizer = AutoTokenizer.from_pretrained(stack.model)
    for c in choices:
        assert c["message"]["content"] == tokenizer.decode(c["token_ids"], skip_special_tokens=True)


def test_grpc_beams_equal_transformers_unary_and_streaming(stack: Stack) -> None:
    prompt = _ids(stack, PROMPT)
    want = _want(stack, prompt, 3, 9, length_penalty=2.0, early_stopping="never")
    kw = dict(max_tokens=9, n=3, use_beam_search=True, length_penalty=2.0, early_stopping="never")
    with Client(stack.grpc_address, timeout=120) as client:
        result = client.generate(token_ids=prompt, **kw)
        deltas = list(client.stream(token_ids=prompt, **kw))
    assert [c.token_ids for c in result.choices] == [t for t, _ in want]
    for c, (tokens, score) in zip(result.choices, want, strict=True):
        assert c.beam_score == pytest.approx(score, rel=1e-5, abs=TOLERANCE)
        assert c.beam_score == pytest.approx(c.cumulative_logprob / len(tokens) ** 2.0)
    with_tokens = [d for d in deltas if any(c.token_ids for c in d.choices)]
    assert len(with_tokens) == 1  # the beams come whole, in one message
    streamed = sorted(with_tokens[0].choices, key=lambda c: c.index)
    assert [c.token_ids for c in streamed] == [t for t, _ in want]
    assert [c.beam_score for c in streamed] == [c.beam_score for c in result.choices]
    assert deltas[-1].usage is not None


def test_beams_share_blocks_while_they_run(stack: Stack) -> None:
    prompt = _ids(stack, LONG_PROMPT)
    n, max_tokens = 4, 40
    copies_of_prompt = n * math.ceil(len(prompt) / BLOCK_SIZE)
    used: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            used.append(stack.stats().blocks_used)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with Client(stack.grpc_address, timeout=300) as client:
            result = client.generate(
                token_ids=prompt, max_tokens=max_tokens, n=n, use_beam_search=True, ignore_eos=True
            )
    finally:
        done.set()
        watcher.join()
    assert [c.token_ids for c in result.choices] == [
        t for t, _ in reference_beams(stack.model, prompt, n, max_tokens)
    ]
    assert max(used) > 0  # it was watched while it ran
    assert max(used) < copies_of_prompt, (max(used), copies_of_prompt)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"temperature": 0.7}, "temperature"),
        ({"stream": True}, "stream"),
        ({"n": 9}, "n"),
        ({"top_p": 0.5}, "top_p"),
        ({"logprobs": 2}, "logprobs"),
        ({"stop": ["\n"]}, "stop"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
    ],
)
def test_http_bad_beam_combinations_are_400(http: httpx.Client, extra: dict, field: str) -> None:
    body = {"prompt": "def ", "max_tokens": 4, "n": 2, "use_beam_search": True, **extra}
    reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_http_beam_fields_without_beam_search_are_400(http: httpx.Client) -> None:
    reply = http.post("/v1/completions", json={"prompt": "def ", "max_tokens": 4, "length_penalty": 2.0})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "length_penalty"


def test_grpc_bad_beam_combination_is_invalid_argument(stack: Stack) -> None:
    with Client(stack.grpc_address, timeout=30) as client:
        with pytest.raises(InvalidArgument) as err:
            client.generate("def ", max_tokens=4, n=2, use_beam_search=True, temperature=0.5)
    assert err.value.field == "temperature" or "temperature" in err.value.message
    with grpc.insecure_channel(stack.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GenerateRequest(
            text="def ", sampling=gateway_pb2.GenerateSamplingParams(max_tokens=4, n=9, use_beam_search=True)
        )
        with pytest.raises(grpc.RpcError) as rpc:
            list(stub.Generate(request, timeout=30))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max-beam-width" in rpc.value.details()


def test_concurrent_beam_and_plain_requests(stack: Stack) -> None:
    prompt = _ids(stack, PROMPT)
    want = _want(stack, prompt, 2, 8)

    async def run():
        async with AsyncClient(stack.grpc_address, timeout=300) as client:
            return await asyncio.gather(
                *(
                    client.generate(token_ids=prompt, max_tokens=8, n=2, use_beam_search=True)
                    for _ in range(3)
                ),
                *(client.generate(token_ids=prompt, max_tokens=8, temperature=0) for _ in range(3)),
            )

    results = asyncio.run(run())
    for result in results[:3]:
        assert [c.token_ids for c in result.choices] == [t for t, _ in want]
    greedy = results[3].choices[0].token_ids
    assert all(r.choices[0].token_ids == greedy for r in results[3:])


@pytest.fixture(scope="module")
def bundled_with_likely_eos(bundled_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of the bundled model (weights and tokenizer) whose EOS is a token it emits soon
    after PROMPT (the 3rd of its greedy continuation), so that beams end with EOS."""
    import json
    import shutil

    from hf_reference import reference_greedy

    path = tmp_path_factory.mktemp("bundled-eos-e2e") / "tiny-py"
    shutil.copytree(bundled_model_path, path)
    prompt = AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [reference_greedy(path, [prompt], 3)[0][2], config["eos_token_id"][-1]]
    (path / "generation_config.json").write_text(json.dumps(config))
    return str(path)


def test_beams_ending_with_eos_over_both_apis(
    bundled_with_likely_eos: str, fresh_redis_url, tmp_path
) -> None:
    from e2e_harness import running_stack

    with running_stack(bundled_with_likely_eos, fresh_redis_url(), tmp_path) as eos_stack:
        prompt = _ids(eos_stack, PROMPT)
        want = _want(eos_stack, prompt, 3, 12, length_penalty=0.7)
        eos = set(eos_stack.stats().eos_token_ids)
        assert any(tokens[-1] in eos for tokens, _ in want)  # EOS is reached
        body = {"prompt": prompt, "max_tokens": 12, "n": 3, "use_beam_search": True, "length_penalty": 0.7}
        reply = httpx.post(
            f"{eos_stack.http_url}/v1/completions", json={**body, "return_token_ids": True}, timeout=120
        )
        assert reply.status_code == 200, reply.text
        choices = reply.json()["choices"]
        _check_choices(choices, want, 0.7)
        assert [c["finish_reason"] for c in choices] == [
            "stop" if t[-1] in eos else "length" for t, _ in want
        ]
        with Client(eos_stack.grpc_address, timeout=120) as client:
            result = client.generate(
                token_ids=prompt, max_tokens=12, n=3, use_beam_search=True, length_penalty=0.7
            )
        assert [c.token_ids for c in result.choices] == [t for t, _ in want]
        assert [c.finish_reason for c in result.choices] == [c["finish_reason"] for c in choices]
