"""A scheduler killed (kill -9) mid-stream loses no request: real processes, real Redis.

16 greedy streams (8 gRPC, 8 SSE over HTTP) run when the scheduler dies. Either the same
scheduler is started again, or a standby already waiting for the pool's lease takes over; the
gateway re-attaches each stream with the tokens it already delivered, and every client gets
exactly the text `transformers` greedy `generate` gives — no token lost, none repeated. Seeded
n=2 sampling gives the same tokens as an undisturbed run. After each test the pool is idle,
`fsck` is clean and Redis equals the scheduler's own view (conftest).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from e2e_harness import Stack, hf_greedy, running_stack
from transformers import AutoTokenizer

from pagedserve.client import AsyncClient
from pagedserve.common.grpc_utils import health_check

NEW_TOKENS = 96
PROMPTS = [
    "def ",
    "class Stack:\n    def __init__(self):\n",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import json\n\n\ndef load(path):\n",
    "async def fetch(session, url):\n",
    "for i in range(10):\n",
    "class Point:\n    def __init__(self, x, y):\n",
    "def is_prime(n):\n    if n < 2:\n",
]


@pytest.fixture(scope="module")
def takeover_stack(bundled_model_path: str, fresh_redis_url, tmp_path_factory: pytest.TempPathFactory):
    """A stack of its own with a standby scheduler (these tests kill schedulers)."""
    logs = tmp_path_factory.mktemp("takeover-stack-logs")
    with running_stack(bundled_model_path, fresh_redis_url(), logs, standby=True, lease_ttl=2.0) as s:
        yield s


async def _streams(stack: Stack, on_progress: Callable[[int], None]) -> tuple[list[str], list[str]]:
    """Every prompt once over gRPC and once as SSE, at the same time; texts in prompt order.
    `on_progress(n)` is called with the number of streams that have some text so far."""
    started: set[tuple[str, int]] = set()

    def seen(key: tuple[str, int]) -> None:
        if key not in started:
            started.add(key)
            on_progress(len(started))

    async def grpc_one(client: AsyncClient, i: int) -> str:
        text = ""
        async for delta in client.stream(PROMPTS[i], max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True):
            for choice in delta.choices:
                text += choice.text
                assert choice.finish_reason in (None, "", "length"), choice.finish_reason
            seen(("grpc", i))
        return text

    async def sse_one(client: httpx.AsyncClient, i: int) -> str:
        body = {
            "prompt": PROMPTS[i],
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        text = ""
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                for choice in event["choices"]:
                    text += choice["text"]
                seen(("http", i))
        return text

    async with AsyncClient(stack.grpc_address, timeout=300) as grpc_client:
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=300) as http_client:
            texts = await asyncio.gather(
                *(grpc_one(grpc_client, i) for i in range(len(PROMPTS))),
                *(sse_one(http_client, i) for i in range(len(PROMPTS))),
            )
    return texts[: len(PROMPTS)], texts[len(PROMPTS) :]


def _expected(model: str) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return [tokenizer.decode(out, skip_special_tokens=True) for out in hf_greedy(model, ids, NEW_TOKENS)]


def _kill_when_all_stream(stack: Stack, kill: Callable[[], None]) -> Callable[[int], None]:
    """A progress callback that kills once all 16 streams have text (from another thread, so
    the event loop keeps reading meanwhile)."""
    fired = threading.Event()

    def on_progress(n: int) -> None:
        if n == 2 * len(PROMPTS) and not fired.is_set():
            fired.set()
            threading.Thread(target=kill).start()

    return on_progress


def _is_active(stack: Stack, name: str) -> bool:
    """Whether that scheduler holds the pool (SERVING); a standby answers NOT_SERVING."""
    return health_check(stack.services[name].address, timeout=1.0)


def test_scheduler_killed_and_restarted_resumes_every_stream(takeover_stack: Stack) -> None:
    """Both schedulers die; the same one is started again and resumes the pool from Redis."""
    stack = takeover_stack
    active = "scheduler" if _is_active(stack, "scheduler") else "standby"
    standby = "standby" if active == "scheduler" else "scheduler"
    resumed_before = stack.stats().resumed_total

    def kill_and_restart() -> None:
        stack.kill(standby)
        stack.kill(active)
        stack.restart(active, wait=False)

    grpc_texts, http_texts = asyncio.run(_streams(stack, _kill_when_all_stream(stack, kill_and_restart)))
    expected = _expected(stack.model)
    for i, want in enumerate(expected):
        assert grpc_texts[i] == want, f"gRPC prompt {i}"
        assert http_texts[i] == want, f"HTTP prompt {i}"
    stats = stack.stats()
    assert stats.resumed_total > 0 and (stats.resumed_total != resumed_before or resumed_before == 0)
    stack.restart(standby, wait=False)
    stack.wait_listening(standby)


def test_standby_takes_over_a_killed_scheduler(takeover_stack: Stack) -> None:
    """The standby (already running, NOT_SERVING) holds the pool within the lease TTL; the
    gateway fails over to it. Seeded n=2 sampling gives the undisturbed run's tokens."""
    stack = takeover_stack
    body = {"prompt": "def ", "max_tokens": 64, "n": 2, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    undisturbed = httpx.post(f"{stack.http_url}/v1/completions", json=body, timeout=120).json()
    active = "scheduler" if _is_active(stack, "scheduler") else "standby"
    standby = "standby" if active == "scheduler" else "scheduler"
    assert not _is_active(stack, standby)

    sampled: dict[str, object] = {}

    def kill_active() -> None:
        stack.kill(active)

    def seeded() -> None:
        time.sleep(0.2)
        sampled["reply"] = httpx.post(f"{stack.http_url}/v1/completions", json=body, timeout=120).json()

    thread = threading.Thread(target=seeded)
    thread.start()
    grpc_texts, http_texts = asyncio.run(_streams(stack, _kill_when_all_stream(stack, kill_active)))
    thread.join(120)
    expected = _expected(stack.model)
    for i, want in enumerate(expected):
        assert grpc_texts[i] == want, f"gRPC prompt {i}"
        assert http_texts[i] == want, f"HTTP prompt {i}"
    assert _is_active(stack, standby), "the standby holds the pool now"
    reply = sampled["reply"]
    assert [c["text"] for c in reply["choices"]] == [c["text"] for c in undisturbed["choices"]]
    stack.restart(active, wait=False)  # back as the standby
    stack.wait_listening(active)
