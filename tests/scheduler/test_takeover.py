"""One writer per pool, and a scheduler that takes over loses no request (real Redis).

A scheduler is "killed" here by abandoning its engine mid-run: its loop stops between steps
and it never writes again, as after a kill -9. A second engine on the same Redis pool then
takes over: it holds the lease with a higher fencing token, rebuilds every in-flight request
from Redis, and clients re-attach with the tokens they already have. The fake executor checks
every KV read, so a block the new scheduler thinks holds a prefix but does not fails here.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import redis

from pagedserve.common.errors import Fenced, Unavailable
from pagedserve.common.outputs import FinishReason
from pagedserve.common.params import SamplingParams
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.lease import Lease
from pagedserve.scheduler.recovery import ChoiceProgress
from pagedserve.scheduler.redis_pool import RedisBlockPool
from pagedserve.scheduler.request import choice_seed

from .fake_executor import FakeExecutor, reference
from .helpers import Collected, assert_pool_clean, drain, settle

VOCAB = 1000
_pool_ids = itertools.count()


def new_pool_id() -> str:
    return f"takeover-{next(_pool_ids)}"


async def leased_engine(
    client: redis.Redis, pool_id: str, fake: FakeExecutor, ttl: float = 5.0
) -> SchedulerEngine:
    lease = Lease(client, pool_id, ttl=ttl)
    assert lease.acquire() == 0.0
    return await SchedulerEngine.connect(fake, RedisBlockPool(client, pool_id), lease=lease, max_num_seqs=8)


async def run_until(
    engine: SchedulerEngine, streams: dict, got: dict[str, Collected], min_tokens: int
) -> None:
    """Step until every stream has `min_tokens` tokens on choice 0, collecting what arrives."""
    while any(len(got[rid].tokens.get(0, [])) < min_tokens for rid in streams):
        await engine.step()
        for rid, stream in streams.items():
            delta = stream.take()
            if delta is not None:
                for c in delta.choices:
                    got[rid].tokens.setdefault(c.index, []).extend(c.token_ids)
    await engine.replicator.flush()


def test_stale_writer_is_refused(redis_client) -> None:
    pool_id = new_pool_id()
    first = Lease(redis_client, pool_id, ttl=0.2, holder="first")
    second = Lease(redis_client, pool_id, ttl=5.0, holder="second")
    assert first.acquire() == 0.0 and first.token == 1
    assert 0 < second.acquire() <= 0.2, "a standby waits while the lease is held"
    pool = RedisBlockPool(redis_client, pool_id)
    pool.fence = first.token
    pool.init(8, 4, "e", "m")
    asyncio.run(asyncio.sleep(0.3))  # the first holder stops renewing: its lease lapses
    assert second.acquire() == 0.0 and second.token == 2
    assert not first.renew(), "a lapsed holder cannot renew after a takeover"
    from pagedserve.scheduler.block_pool import StepOps

    ops = StepOps()
    ops.allocate("r", 1)
    with pytest.raises(Fenced, match="stale"):
        pool.apply(ops, first.token)
    assert pool.apply(ops, second.token).results[0].ok
    assert pool.check() == []


def test_a_write_racing_our_own_retake_of_the_lease_is_not_fenced(redis_client) -> None:
    """The lease lapsed (the process was stopped) and the renewer's thread is taking it again: the
    pool is at the new token in Redis before `lease.token` says so. A step's write with the old
    token, refused meanwhile, must find it was our own retake (a whole write follows), not stop
    the scheduler as if another had taken over (an e2e fault test failed so once)."""
    import threading
    import time

    from pagedserve.scheduler.block_pool import StepOps

    pool_id = new_pool_id()
    fake = FakeExecutor(32, 4, VOCAB)

    async def go() -> None:
        engine = await leased_engine(redis_client, pool_id, fake)
        replicator, lease = engine.replicator, engine.replicator.lease
        old = lease.token
        retaking, done = threading.Event(), threading.Event()

        def retake() -> None:  # as the renewer does, with the token's assignment held back
            with lease.lock:
                redis_client.delete(lease.lease_key)
                assert lease.acquire() == 0.0 and lease.token == old + 1
                lease.token = old
                retaking.set()
                time.sleep(0.3)
                lease.token = old + 1
            done.set()

        threading.Thread(target=retake).start()
        assert await asyncio.to_thread(retaking.wait, 5)
        ops = StepOps()
        ops.allocate("r", 1)
        await asyncio.to_thread(replicator._apply, ops, engine.scheduler.blocks.counts())
        assert await asyncio.to_thread(done.wait, 5)
        assert lease.token == old + 1 and replicator.stale and not replicator.fenced
        await engine.stop()

    asyncio.run(go())


def test_a_fenced_scheduler_stops_and_fails_its_streams(redis_client) -> None:
    pool_id = new_pool_id()
    fake = FakeExecutor(32, 4, VOCAB)

    async def go() -> None:
        engine = await leased_engine(redis_client, pool_id, fake, ttl=0.3)
        stream = engine.submit("a", [5, 6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        await engine.step()
        await engine.replicator.flush()
        redis_client.delete(Lease(redis_client, pool_id).lease_key)  # as if it had lapsed
        usurper = Lease(redis_client, pool_id, holder="usurper")
        assert usurper.acquire() == 0.0
        engine.start()
        with pytest.raises(Unavailable, match="another scheduler"):
            await asyncio.wait_for(drain(stream), 10)
        with pytest.raises(Unavailable):
            engine.submit("b", [5], SamplingParams(max_tokens=2))
        await engine.stop()
        assert not engine.serving

    asyncio.run(go())


@pytest.mark.parametrize("executor_restarted", [False, True])
def test_takeover_resumes_every_request(redis_client, executor_restarted) -> None:
    """Greedy and seeded n=2 requests, taken over mid-way: each choice's tokens equal an
    undisturbed run's, once each, whether the executor kept its pool (same epoch: committed
    prefix blocks are reused) or lost it."""
    pool_id = new_pool_id()
    fake = FakeExecutor(64, 4, VOCAB)
    prompts = {"g1": [5, 6, 7, 8, 9, 10, 11], "g2": list(range(20, 33)), "s": [40, 41, 42, 43, 44]}
    params = {
        "g1": SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        "g2": SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
        "s": SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=2, ignore_eos=True),
    }

    async def go() -> tuple[dict[str, Collected], SchedulerEngine]:
        first = await leased_engine(redis_client, pool_id, fake, ttl=0.3)
        streams = {rid: first.submit(rid, prompts[rid], params[rid]) for rid in prompts}
        got = {rid: Collected() for rid in prompts}
        await run_until(first, streams, got, min_tokens=3)
        # A token generated but never delivered (the stream message was lost with the process):
        await first.step()
        await first.replicator.flush()
        # ... kill -9: the first engine never steps or writes again; its lease lapses. The
        # executor also holds a sequence whose state write was lost with it: Redis never heard
        # of it, so only "forget everything" can clear it.
        fake.requests["lost-with-the-old-scheduler"] = next(iter(fake.requests.values()))
        await asyncio.sleep(0.35)
        if executor_restarted:
            fake.restart()
        second = await leased_engine(redis_client, pool_id, fake)
        assert second.replicator.lease.token > first.replicator.lease.token
        assert sorted(second.scheduler.detached) == sorted(prompts)
        resumed = {}
        for rid in prompts:
            have = [ChoiceProgress(i, got[rid].tokens.get(i, [])) for i in range(params[rid].n)]
            resumed[rid] = second.attach(rid, prompts[rid], params[rid], 0, have)
        second.start()
        rest = await asyncio.wait_for(asyncio.gather(*(drain(resumed[rid]) for rid in prompts)), 30)
        await settle(second)
        for rid, more in zip(prompts, rest, strict=True):
            for i, tokens in more.tokens.items():
                got[rid].tokens.setdefault(i, []).extend(tokens)
            got[rid].finish = more.finish
        return got, second

    got, second = asyncio.run(go())
    for rid, p in params.items():
        for i in range(p.n):
            want = reference(
                prompts[rid], p.max_tokens, VOCAB, seed=choice_seed(p.seed, i) if p.seed else None
            )
            assert got[rid].tokens[i] == want, (rid, i)
            assert got[rid].finish[i] == FinishReason.LENGTH
    assert second.scheduler.stats.num_resumed == 3
    if not executor_restarted:
        assert second.scheduler.stats.prefix_hit_tokens > 0, "committed full blocks were reused"
    assert fake.requests == {}  # the stale sequence too
    assert_pool_clean(second)


def test_reattach_to_a_request_redis_never_heard_of(redis_client) -> None:
    """A request whose first write never landed: the client's tokens are the record."""
    pool_id = new_pool_id()
    fake = FakeExecutor(32, 4, VOCAB)
    prompt = [9, 8, 7, 6, 5]
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = reference(prompt, 8, VOCAB)

    async def go() -> Collected:
        engine = await leased_engine(redis_client, pool_id, fake)
        stream = engine.attach("ghost", prompt, p, 0, [ChoiceProgress(0, want[:5])])
        engine.start()
        out = await asyncio.wait_for(drain(stream), 10)
        await settle(engine)
        assert_pool_clean(engine)
        return out

    out = asyncio.run(go())
    assert out.tokens[0] == want[5:]
    assert out.usage.completion_tokens == 8


def test_taking_the_lease_again_from_two_threads_keeps_the_last_token(redis_client) -> None:
    """Redis lost the lease key: the renewer and a whole write both take it again, on worker
    threads, at once. The token the scheduler steps with is the one Redis holds, never an
    older answer that came back later (the executor would refuse the next step as stale)."""
    import threading

    from pagedserve.scheduler.redis_keys import PoolKeys
    from pagedserve.scheduler.replication import Replicator

    pool_id = new_pool_id()
    lease = Lease(redis_client, pool_id, ttl=5.0)
    assert lease.acquire() == 0.0
    replicator = Replicator(RedisBlockPool(redis_client, pool_id), lease)
    meta = PoolKeys(pool_id).meta
    for _ in range(20):
        redis_client.delete(meta, lease.lease_key)  # as after a restart with no data
        start = threading.Barrier(4)

        def again(barrier: threading.Barrier = start) -> None:
            barrier.wait()
            assert replicator._reacquire()

        threads = [threading.Thread(target=again) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert int(redis_client.hget(meta, "fence")) == lease.token
        assert lease.renew()


def test_redis_lost_and_back_empty_is_rewritten_from_the_schedulers_view() -> None:
    """Redis dies mid-run (a local server of its own, killed) and comes back empty on the same
    port: the scheduler keeps serving from its own view (streams finish, identical), reports
    not serving meanwhile, takes its lease again with a higher token and rewrites the pool."""
    from pagedserve.common.redis_harness import RedisServer

    server = RedisServer(prefer_docker=False).start()
    port = server.port
    client = redis.Redis.from_url(server.url, socket_timeout=2.0, socket_connect_timeout=1.0)
    fake = FakeExecutor(48, 4, VOCAB)
    fake.step_delay = 0.01
    prompts = {f"r{i}": [7 + i, 8, 9, 10, 11 + i] for i in range(4)}
    p = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)

    async def go() -> tuple[list[Collected], SchedulerEngine, bool]:
        engine = await leased_engine(client, "lost", fake, ttl=0.6)
        token_before = engine.replicator.lease.token
        streams = [engine.submit(rid, prompt, p) for rid, prompt in prompts.items()]
        engine.start()
        await asyncio.sleep(0.2)
        server.stop()  # Redis is gone (and its data with it)
        saw_down = False
        for _ in range(40):
            await asyncio.sleep(0.02)
            saw_down = saw_down or not engine.serving
        restarted = RedisServer(prefer_docker=False, port=port).start()
        try:
            assert not all(s.finished for s in streams), "the requests outlive the outage"
            outs = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 60)
            for _ in range(200):  # the lease is taken again and the pool rewritten
                if engine.replicator.lease.token > token_before and engine.replicator.idle and engine.serving:
                    break
                await asyncio.sleep(0.05)
            await settle(engine)
            assert engine.replicator.lease.token > token_before
            assert engine.replicator.num_full_writes >= 1
            assert_pool_clean(engine)
        finally:
            restarted.stop()
        return outs, engine, saw_down

    try:
        outs, engine, saw_down = asyncio.run(go())
    finally:
        client.close()
        server.stop()
    for out, prompt in zip(outs, prompts.values(), strict=True):
        assert out.tokens[0] == reference(prompt, 150, VOCAB)
    assert saw_down, "not serving while Redis was gone"


def test_the_executor_refuses_a_scheduler_that_lost_the_pool(redis_client) -> None:
    """Two schedulers, one executor: once the second took the pool (a higher fencing token) and
    stepped, the first one's next step is refused by the executor itself, and it stops."""
    pool_id = new_pool_id()
    fake = FakeExecutor(32, 4, VOCAB)

    async def go() -> None:
        first = await leased_engine(redis_client, pool_id, fake, ttl=0.3)
        stream = first.submit("a", [5, 6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        await first.step()
        await asyncio.sleep(0.35)  # its lease lapses (it is not renewing: its loop is not started)
        second = await leased_engine(redis_client, pool_id, fake)
        assert second.scheduler.fence > first.scheduler.fence
        second.submit("b", [9, 9, 9], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        await second.step()  # the executor now knows the higher token
        assert fake.max_fence == second.scheduler.fence
        await first.step()
        assert first.replicator.fenced and "refused" in first.replicator.fenced
        first.start()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(drain(stream), 10)
        await first.stop()
        await settle(second)

    asyncio.run(go())
