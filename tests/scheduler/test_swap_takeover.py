"""A scheduler taken over while groups are swapped out (real Redis): the replica's CPU tables
are freed with its device tables, the swapped sequences are recomputed from their stored
outputs, and every client gets exactly the undisturbed tokens once."""

from __future__ import annotations

import asyncio
import itertools

import redis

from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.lease import Lease
from pagedserve.scheduler.recovery import ChoiceProgress
from pagedserve.scheduler.redis_pool import RedisBlockPool

from .fake_executor import FakeExecutor
from .helpers import Collected, assert_pool_clean, drain, settle
from .test_swap_policy import VOCAB, expected, mixed_load

_pool_ids = itertools.count()


async def leased_engine(client: redis.Redis, pool_id: str, fake: FakeExecutor, ttl: float) -> SchedulerEngine:
    lease = Lease(client, pool_id, ttl=ttl)
    assert lease.acquire() == 0.0
    return await SchedulerEngine.connect(
        fake, RedisBlockPool(client, pool_id), lease=lease, preemption_mode="swap", max_num_batched_tokens=64
    )


def collect(streams: dict, got: dict[str, Collected]) -> None:
    for rid, stream in streams.items():
        delta = stream.take()
        if delta is not None:
            for c in delta.choices:
                got[rid].tokens.setdefault(c.index, []).extend(c.token_ids)


def test_takeover_with_swapped_groups_recomputes_them(redis_client) -> None:
    pool_id = f"swap-takeover-{next(_pool_ids)}"
    fake = FakeExecutor(24, 4, VOCAB, num_cpu_blocks=40)
    load = mixed_load(seed=7)

    async def go() -> tuple[dict[str, Collected], SchedulerEngine]:
        first = await leased_engine(redis_client, pool_id, fake, ttl=0.3)
        streams = {rid: first.submit(rid, p, s) for rid, p, s in load}
        got = {rid: Collected() for rid, _, _ in load}
        for _ in range(500):
            await first.step()
            collect(streams, got)
            if first.scheduler.swapped and first.scheduler.stats.generated_tokens > 20:
                break
        assert first.scheduler.swapped, "the load must swap"
        await first.replicator.flush()
        stored = RedisBlockPool(redis_client, pool_id).snapshot()
        assert stored.cpu_tables and stored.cpu_ref  # Redis holds the swapped sequences' CPU tables
        assert RedisBlockPool(redis_client, pool_id).check() == []
        # kill -9: the first engine never steps again; its lease lapses. Same executor (same epoch).
        await asyncio.sleep(0.35)
        second = await leased_engine(redis_client, pool_id, fake, ttl=5.0)
        snap = second.pool.snapshot()
        assert snap.cpu_tables == {} and sorted(snap.cpu_free_list) == list(range(40))
        assert second.scheduler.blocks.cpu_tables == {}
        resumed = {}
        for rid, prompt, params in load:
            have = [ChoiceProgress(i, got[rid].tokens.get(i, [])) for i in range(params.n)]
            resumed[rid] = second.attach(rid, prompt, params, 0, have)
        second.start()
        rest = await asyncio.wait_for(asyncio.gather(*(drain(resumed[rid]) for rid, _, _ in load)), 30)
        await settle(second)
        for (rid, _, _), more in zip(load, rest, strict=True):
            for i, tokens in more.tokens.items():
                got[rid].tokens.setdefault(i, []).extend(tokens)
        return got, second

    got, second = asyncio.run(go())
    for rid, prompt, params in load:
        assert got[rid].tokens == expected(prompt, params), rid
    assert fake.requests == {}
    assert_pool_clean(second)
