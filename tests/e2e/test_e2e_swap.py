"""Swap preemption through the whole stack (real processes, real Redis, the bundled model).

A pool of 24 blocks (MAX_MODEL_LEN needs 24) under a mixed load that wants about 70 at once —
n=4 seeded sampling beside plain greedy requests and a beam search — must preempt; with --preemption-mode swap
or auto it swaps the n=4 groups to the executor's CPU blocks. Every output equals the
unconstrained run's (the session stack, 512 blocks), the swap metrics move, and fsck is clean
on the device and the CPU blocks (conftest checks after each test). An executor killed with
kill -9 while blocks are swapped out comes back with a new epoch: the swapped sequences fall
back to recompute and every output is still the same.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest
from e2e_harness import Stack, metric, running_stack

SMALL_POOL = 24
SWAP_GIB = "0.005"  # 81 CPU blocks of 64 KiB (the bundled model: 4 layers, 4 KV heads x 32, fp32)
LOAD = [
    {"prompt": "def ", "max_tokens": 56, "temperature": 0},
    {"prompt": "class Stack:\n", "max_tokens": 40, "temperature": 0.8, "seed": 5, "n": 4},
    {"prompt": "import json\n", "max_tokens": 56, "temperature": 0},
    {"prompt": "for i in range(10):\n", "max_tokens": 40, "temperature": 0.8, "seed": 9, "n": 4},
    {"prompt": "async def fetch(url):\n", "max_tokens": 56, "temperature": 0},
    {"prompt": "def is_prime(n):\n", "max_tokens": 40, "temperature": 1.0, "seed": 13, "n": 4},
    {"prompt": "while True:\n", "max_tokens": 56, "temperature": 0},
    # beam search beside them: preempted by restarting its search, never swapped (beam_steps.py)
    {"prompt": "def add(a, b):\n", "max_tokens": 32, "use_beam_search": True, "n": 3},
]


def _texts(url: str) -> list[list[str]]:
    """Every request of LOAD at once; each one's choice texts in index order."""

    def one(body: dict) -> list[str]:
        beam = body.get("use_beam_search", False)
        with httpx.Client(base_url=url, timeout=300) as http:
            reply = http.post("/v1/completions", json=body if beam else {**body, "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
            assert beam or all(c["finish_reason"] == "length" for c in choices)
            return [c["text"] for c in choices]

    with concurrent.futures.ThreadPoolExecutor(len(LOAD)) as pool:
        return list(pool.map(one, LOAD))


@pytest.fixture(scope="module")
def unconstrained(stack: Stack) -> list[list[str]]:
    return _texts(stack.http_url)


def _small_stack(model: str, redis_url: str, logs, mode: str):
    return running_stack(
        model,
        redis_url,
        logs,
        num_kv_blocks=SMALL_POOL,
        stall_timeout=60.0,
        executor_args=("--swap-space", SWAP_GIB),
        scheduler_args=("--preemption-mode", mode),
    )


@pytest.mark.parametrize("mode", ["swap", "auto"])
def test_swapping_pool_gives_the_unconstrained_outputs(
    mode, unconstrained, bundled_model_path, fresh_redis_url, tmp_path_factory
) -> None:
    logs = tmp_path_factory.mktemp(f"swap-{mode}-logs")
    with _small_stack(bundled_model_path, fresh_redis_url(), logs, mode) as small:
        assert _texts(small.http_url) == unconstrained
        text = httpx.get(f"{small.http_url}/metrics").text
        assert metric(text, "pagedserve_swap_out_blocks_total") > 0
        assert metric(text, "pagedserve_swap_in_blocks_total") > 0
        assert metric(text, "pagedserve_kv_cpu_blocks_total") == 81
        stats = small.stats()
        assert stats.swap_out_blocks_total == stats.swap_in_blocks_total  # everything came back
        assert stats.swapped_blocks == 0
        small.assert_clean()


def test_executor_killed_while_swapped_recomputes_and_loses_nothing(
    unconstrained, bundled_model_path, fresh_redis_url, tmp_path_factory
) -> None:
    logs = tmp_path_factory.mktemp("swap-kill-logs")
    with _small_stack(bundled_model_path, fresh_redis_url(), logs, "swap") as small:
        swapped_at_kill: list[int] = []
        done = threading.Event()

        def kill_when_swapped() -> None:
            while not done.is_set():
                swapped = small.stats().swapped_blocks
                if swapped > 0:
                    swapped_at_kill.append(swapped)
                    small.kill("executor")  # kill -9: its pool and its swap space are gone
                    small.restart("executor")
                    return
                time.sleep(0.01)

        watcher = threading.Thread(target=kill_when_swapped)
        watcher.start()
        try:
            texts = _texts(small.http_url)
        finally:
            done.set()
            watcher.join()
        assert swapped_at_kill, "the executor was never killed while blocks were swapped out"
        assert texts == unconstrained
        text = httpx.get(f"{small.http_url}/metrics").text
        assert metric(text, "pagedserve_kv_swapped_blocks") == 0
        small.assert_clean()
