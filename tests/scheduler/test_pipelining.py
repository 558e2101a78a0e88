"""How the scheduler overlaps its steps with the executor's (`SchedulerEngine.step_ahead`): step
k + 1 is planned while step k runs, and sent before k returns, so the executor starts it as soon as
k ends; after a long step the next is planned when it returns instead (`LATE_PLAN_TOKENS`)."""

from __future__ import annotations

import asyncio

import pytest

from pagedserve.scheduler.engine import LATE_PLAN_TOKENS, SEND_EARLY_SWITCH

from . import test_policy
from .fake_executor import reference
from .helpers import assert_pool_clean, drain, settle
from .test_policy import VOCAB, greedy, prompts

build = test_policy.build  # the fixture: (scheduler engine, fake executor) on each block pool


def generate_and_check(engine, asks: list[list[int]], max_tokens: int) -> None:
    """Runs the step loop on greedy requests for `asks` and checks every output."""

    async def go():
        streams = [engine.submit(f"r{i}", p, greedy(max_tokens)) for i, p in enumerate(asks)]
        engine.start()
        try:
            outs = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 30)
        finally:
            await engine.stop()
        await settle(engine)
        return outs

    for out, p in zip(asyncio.run(go()), asks, strict=True):
        assert out.tokens[0] == reference(p, max_tokens, VOCAB)


@pytest.mark.parametrize("send_early", [True, False])
def test_the_next_step_reaches_the_executor_before_the_last_one_ends(build, send_early, monkeypatch):
    """With the step after k sent while k runs, the executor never waits for the scheduler
    between decode steps; switched off (PAGEDSERVE_SEND_EARLY=0), every step is sent after the one
    before it returned. The tokens are the same either way."""
    monkeypatch.setenv(SEND_EARLY_SWITCH, "1" if send_early else "0")
    engine, fake = build(num_blocks=256, block_size=4)
    fake.step_delay = 0.01
    asks = prompts([7, 12, 5])
    generate_and_check(engine, asks, 12)
    # the decode steps: each one after the first (the prefill) and before the last
    early = [fake.arrived[i + 1] < fake.finished[i] for i in range(1, len(fake.steps) - 2)]
    assert len(early) >= 8
    assert all(early) if send_early else not any(early), early
    assert_pool_clean(engine)


def test_a_step_sent_after_one_that_failed_is_dropped(build, monkeypatch):
    """When step k fails (here: the executor restarted, a new epoch), step k + 1 was already sent;
    its result is dropped with k's, every sequence is recomputed, and the outputs stay right."""
    monkeypatch.setenv(SEND_EARLY_SWITCH, "1")
    engine, fake = build(num_blocks=256, block_size=4)
    fake.step_delay = 0.005
    fake.restart_before_step = 4  # a decode step, with the step after it already on its way
    asks = prompts([6, 9])
    generate_and_check(engine, asks, 10)
    assert fake.restart_before_step is None  # the restart happened
    assert len(fake.arrived) - len(fake.steps) == 2  # refused: step 4, and the one sent behind it
    assert any(s.new_requests and s.step_id > 4 for s in fake.steps)  # recomputed after it
    assert_pool_clean(engine)


@pytest.mark.parametrize("first_len", [LATE_PLAN_TOKENS, 8])
def test_a_request_that_comes_during_a_long_step_joins_the_next(build, first_len):
    """The next step is planned while one runs, except after a long step (a prefill of at least
    LATE_PLAN_TOKENS): a request that comes while such a step runs is in the step right after it,
    not in the one after that. A short step keeps planning ahead (the executor never waits)."""
    engine, fake = build(num_blocks=256, block_size=4)
    fake.step_delay = 0.05
    first, second = prompts([first_len, 5])

    async def go():
        a = engine.submit("a", first, greedy(4))
        engine.start()
        try:
            while not fake.steps:  # a's prefill is running
                await asyncio.sleep(0.001)
            b = engine.submit("b", second, greedy(4))
            outs = await asyncio.wait_for(asyncio.gather(drain(a), drain(b)), 30)
        finally:
            await engine.stop()
        await settle(engine)
        return outs

    out_a, out_b = asyncio.run(go())
    assert out_a.tokens[0] == reference(first, 4, VOCAB) and out_b.tokens[0] == reference(second, 4, VOCAB)
    joined = next(i for i, s in enumerate(fake.steps) if any(r.request_id == "b" for r in s.new_requests))
    # after a long step, b is in step 1; after a short one, step 1 was planned before b came
    assert joined == (1 if first_len >= LATE_PLAN_TOKENS else 2), [
        s.total_num_scheduled_tokens for s in fake.steps
    ]
    assert_pool_clean(engine)
