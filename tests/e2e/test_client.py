"""The Python SDK (`pagedserve.client`) against the running stack: typed results, streams,
cancellation by closing, timeouts."""

from __future__ import annotations

import asyncio
import time

import pytest
from e2e_harness import Stack

from pagedserve.client import AsyncClient, Client, DeadlineExceeded, GenerationDelta, GenerationResult

CHAT = [{"role": "user", "content": "Write a Python function: Return the square of x."}]


def _wait_idle_within(stack: Stack, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while stack.stats().blocks_used or stack.stats().requests_running:
        assert time.monotonic() < deadline, f"not idle within {seconds}s: {stack.stats()}"
        time.sleep(0.02)


def test_sync_client_all_prompt_forms(stack: Stack) -> None:
    with Client(stack.grpc_address, timeout=60) as client:
        by_text = client.generate("def square(x):", max_tokens=8, temperature=0, ignore_eos=True)
        assert isinstance(by_text, GenerationResult) and by_text.model == client.models()[0].id
        (choice,) = by_text.choices
        assert choice.finish_reason == "length" and len(choice.token_ids) == 8 and choice.text
        assert by_text.usage.completion_tokens == 8 and by_text.usage.prompt_tokens > 0

        by_ids = client.generate(token_ids=[1, 5, 6, 7], max_tokens=4, temperature=0, ignore_eos=True)
        assert by_ids.usage.prompt_tokens == 4 and len(by_ids.choices[0].token_ids) == 4

        chat = client.generate(messages=CHAT, max_tokens=8, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")

        deltas = list(client.stream("def square(x):", max_tokens=8, temperature=0, ignore_eos=True))
        assert all(isinstance(d, GenerationDelta) for d in deltas)
        assert "".join(c.text for d in deltas for c in d.choices) == choice.text
        assert [t for d in deltas for c in d.choices for t in c.token_ids] == choice.token_ids
        assert deltas[-1].usage is not None and deltas[-1].choices[-1].finish_reason == "length"


def test_timeout_raises_and_aborts(stack: Stack) -> None:
    with Client(stack.grpc_address, timeout=0.5) as client, pytest.raises(DeadlineExceeded):
        client.generate("import ", max_tokens=370, n=16, ignore_eos=True)  # 2.5 s here, deadline 0.5 s
    _wait_idle_within(stack, 3.0)  # one step after the deadline; slack for a loaded 2-core machine


def test_async_client_stream_closed_early_cancels(stack: Stack) -> None:
    async def run() -> str:
        async with AsyncClient(stack.grpc_address, timeout=60) as client:
            stream = client.stream("class ", max_tokens=300, ignore_eos=True)
            first = await anext(stream)
            await stream.aclose()
            assert (await client.generate("x", max_tokens=2)).choices
            return first.request_id

    assert asyncio.run(run())
    _wait_idle_within(stack, 3.0)  # one step after the deadline; slack for a loaded 2-core machine


def test_token_ids_only(stack: Stack) -> None:
    """detokenize=False: the same token ids as with text, and no text."""
    with Client(stack.grpc_address, timeout=60) as client:
        with_text = client.generate(token_ids=[1, 5, 6, 7], max_tokens=12, temperature=0, ignore_eos=True)
        ids_only = client.generate(
            token_ids=[1, 5, 6, 7], max_tokens=12, temperature=0, ignore_eos=True, detokenize=False
        )
    assert ids_only.choices[0].token_ids == with_text.choices[0].token_ids
    assert ids_only.choices[0].text == "" and with_text.choices[0].text
