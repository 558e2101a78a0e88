"""Driving a `SchedulerEngine` in tests: collect every stream, check the pool is clean at the end."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pagedserve.common.outputs import FinishReason, Usage
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.output import RequestStream


@dataclass
class Collected:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list] = field(default_factory=dict)
    finish: dict[int, FinishReason] = field(default_factory=dict)
    stop_token: dict[int, int] = field(default_factory=dict)
    scores: dict[int, tuple[float, float]] = field(default_factory=dict)  # beam: (cumulative, score)
    messages: int = 0
    usage: Usage | None = None
    cached_prompt_tokens: int | None = None
    prompt_logprobs: list = field(default_factory=list)
    prompt_logprobs_messages: int = 0  # messages that carried prompt logprobs


async def drain(stream: RequestStream) -> Collected:
    out = Collected()
    while True:
        delta = await stream.get()
        out.messages += 1
        if delta.cached_prompt_tokens is not None:
            out.cached_prompt_tokens = delta.cached_prompt_tokens
        if delta.prompt_logprobs:
            out.prompt_logprobs.extend(delta.prompt_logprobs)
            out.prompt_logprobs_messages += 1
        for choice in delta.choices:
            out.tokens.setdefault(choice.index, []).extend(choice.token_ids)
            out.logprobs.setdefault(choice.index, []).extend(choice.logprobs)
            if choice.finish_reason != FinishReason.NONE:
                out.finish[choice.index] = choice.finish_reason
                out.stop_token[choice.index] = choice.stop_token_id
            if choice.beam_score is not None:
                out.scores[choice.index] = (choice.cumulative_logprob, choice.beam_score)
        if delta.finished:
            out.usage = delta.usage
            return out


async def run_all(
    engine: SchedulerEngine, streams: list[RequestStream], timeout: float = 60.0
) -> list[Collected]:
    engine.start()
    try:
        return await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), timeout)
    finally:
        await engine.stop()


async def settle(engine: SchedulerEngine) -> None:
    """Run the loop until the pool has learned everything (the last frees go with a step)."""
    engine.start()
    for _ in range(1000):
        if not engine.scheduler.has_work():
            break
        await asyncio.sleep(0.005)
    await engine.stop()


def assert_pool_clean(engine: SchedulerEngine) -> None:
    """fsck passes on the replica and on the scheduler's own view, the two are equal, and every
    block is free or cached (no reference left)."""
    pool = engine.pool
    assert pool.check() == []
    assert engine.scheduler.blocks.check() == []
    assert engine.scheduler.compare_with_replica(pool.snapshot(), pool.load_requests()) == []
    counts = pool.counts()
    assert counts.num_used == 0, counts
    assert counts.num_total == pool.num_blocks
    assert engine.scheduler.blocks.counts() == counts
