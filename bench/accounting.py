"""Scenarios measured on the scheduler itself (no model): capacity and sharing.

The real `SchedulerEngine` and block pool (in memory; the Redis pool answers the same, as
tests/scheduler/test_block_pool_property.py checks) drive a no-op executor that samples a
random token whenever a token is due, so every figure is the scheduler's own block accounting.

- capacity: every request of a trace is queued at once into a fixed KV budget; the most
  sequences running in one step, paged (max_num_seqs unbounded) against a contiguous
  reservation emulated by max_num_seqs = num_blocks * block_size // max_model_len (the number
  of max_model_len reservations the same budget holds).
- sharing: peak blocks referenced while n = 4 samples of one prompt run (forked, sharing the
  prompt's blocks) against four separate requests with distinct prompts of the same length;
  and requests behind one shared system prompt (prefix cache) against each with its own.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import NamedTuple

from pagedserve.bench.scheduler_bench import NoOpExecutorClient
from pagedserve.bench.workload import BenchRequest
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import SampledToken, StepInput, StepOutput
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.memory_pool import InMemoryBlockPool


class RandomTokenExecutor(NoOpExecutorClient):
    """The no-op executor, sampling a random token instead of a fixed one (so parallel
    samples diverge, as they do with temperature > 0)."""

    def __init__(self, *args, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)

    async def execute_step(self, step: StepInput) -> StepOutput:
        out = await super().execute_step(step)
        out.sampled = [SampledToken(s.request_id, self.rng.randrange(3, 4000)) for s in out.sampled]
        return out


class AccountingRun(NamedTuple):
    steps: int
    peak_running: int
    peak_blocks_used: int
    mean_kv_utilization: float  # over steps with a running sequence
    preemptions: int


async def _run(
    requests: Sequence[BenchRequest], *, num_blocks: int, block_size: int, max_model_len: int,
    max_num_seqs: int, max_num_batched_tokens: int = 2048, temperature: float = 0.0, lead: bool = False,
) -> AccountingRun:  # fmt: skip
    """Queue `requests` and step to the end. lead=True: the first request runs its prefill
    alone before the rest are queued (so its prompt is in the prefix cache for them)."""
    executor = RandomTokenExecutor(num_blocks, block_size, max_model_len=max_model_len)
    engine = await SchedulerEngine.connect(
        executor, InMemoryBlockPool(), max_num_seqs=max_num_seqs, max_model_len=max_model_len,
        max_num_batched_tokens=max_num_batched_tokens, max_queued_requests=max(1024, len(requests)),
    )  # fmt: skip
    sched = engine.scheduler

    def submit(i: int, r: BenchRequest) -> None:
        params = SamplingParams(
            max_tokens=r.output_len, ignore_eos=True, n=r.n, temperature=temperature, seed=i
        )
        engine.submit(f"acc-{i}", list(r.prompt_token_ids), params)

    pending = list(enumerate(requests))
    if lead and pending:
        submit(*pending.pop(0))
        while not sched.stats.generated_tokens:
            await engine.step()
    for i, r in pending:
        submit(i, r)
    steps = peak_running = peak_used = 0
    utils = []
    while sched.has_work():
        if not await engine.step():
            continue
        steps += 1
        peak_running = max(peak_running, len(sched.running))
        peak_used = max(peak_used, sched.blocks.counts().num_used)
        if sched.running:
            utils.append(sched.stats.kv_utilization)
    mean = sum(utils) / len(utils) if utils else float("nan")
    return AccountingRun(steps, peak_running, peak_used, mean, sched.stats.num_preemptions)


def run_accounting(requests: Sequence[BenchRequest], **kwargs) -> AccountingRun:
    return asyncio.run(_run(requests, **kwargs))


class Capacity(NamedTuple):
    num_blocks: int
    block_size: int
    max_model_len: int
    contiguous_slots: int  # sequences a max_model_len reservation per sequence fits
    paged: AccountingRun
    contiguous: AccountingRun


def capacity(
    requests: Sequence[BenchRequest], *, num_blocks: int, block_size: int, max_model_len: int
) -> Capacity:
    slots = max(1, num_blocks * block_size // max_model_len)
    common = dict(num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len)
    paged = run_accounting(requests, max_num_seqs=max(len(requests), 1), **common)
    contiguous = run_accounting(requests, max_num_seqs=slots, **common)
    return Capacity(num_blocks, block_size, max_model_len, slots, paged, contiguous)


class SharingRow(NamedTuple):
    case: str
    shared_blocks: int  # peak blocks referenced with sharing
    unshared_blocks: int  # the same demand with nothing to share
    note: str


def sharing(
    *, vocab_size: int, block_size: int, num_blocks: int, max_model_len: int, prompt_len: int,
    output_len: int, system_len: int, num_users: int, user_len: int, seed: int = 0,
) -> list[SharingRow]:  # fmt: skip
    """Peak blocks referenced, with and without sharing, for n=4 sampling and a system prompt."""
    from pagedserve.bench.workload import shared_prefix

    rng = random.Random(seed)
    common = dict(num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len, max_num_seqs=256)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(n)]

    forked = run_accounting([BenchRequest(ids(prompt_len), output_len, n=4)], temperature=1.0, **common)
    separate = run_accounting(
        [BenchRequest(ids(prompt_len), output_len) for _ in range(4)], temperature=1.0, **common
    )
    kw = dict(
        vocab_size=vocab_size, system_len=system_len, user_len=user_len, output_len=output_len, seed=seed
    )
    with_prefix = run_accounting(shared_prefix(num_users, shared=True, **kw), lead=True, **common)
    without_prefix = run_accounting(shared_prefix(num_users, shared=False, **kw), lead=True, **common)
    return [
        SharingRow(
            f"n=4 parallel sampling (prompt {prompt_len}, output {output_len})",
            forked.peak_blocks_used, separate.peak_blocks_used,
            "without: 4 requests with distinct prompts of the same length",
        ),
        SharingRow(
            f"{num_users} requests, shared system prompt {system_len} + user {user_len}, output {output_len}",
            with_prefix.peak_blocks_used, without_prefix.peak_blocks_used,
            "the first request runs its prefill first; without: each request has its own system prompt",
        ),
    ]  # fmt: skip
