"""The scheduler through a Sentinel URL and a Cluster URL (real redis-servers): it takes its
pool's lease, replicates every step, and a second scheduler takes over mid-run from what
the first left in Redis, with greedy outputs equal to an undisturbed run's and the pool
clean. The whole stack on a cluster: tests/e2e/test_redis_cluster.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from pagedserve.common.params import SamplingParams
from pagedserve.common.redis_connect import connect
from pagedserve.common.redis_topologies import LocalRedisCluster, LocalRedisSentinel
from pagedserve.scheduler.fsck import fsck
from pagedserve.scheduler.recovery import ChoiceProgress

from .fake_executor import FakeExecutor, reference
from .helpers import Collected, assert_pool_clean, drain, settle
from .test_takeover import VOCAB, leased_engine, run_until


@pytest.fixture(params=["sentinel", "cluster"])
def topology_url(request) -> Iterator[str]:
    topo = LocalRedisSentinel(password="s3") if request.param == "sentinel" else LocalRedisCluster(masters=3)
    with topo:
        yield topo.url


def test_takeover_through_the_url(topology_url: str) -> None:
    client = connect(topology_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    pool_id = "topology-pool"
    fake = FakeExecutor(64, 4, VOCAB)
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": list(range(20, 33))}
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    async def go() -> dict[str, Collected]:
        first = await leased_engine(client, pool_id, fake, ttl=0.3)
        streams = {rid: first.submit(rid, prompt, params) for rid, prompt in prompts.items()}
        got = {rid: Collected() for rid in prompts}
        await run_until(first, streams, got, min_tokens=4)
        await asyncio.sleep(0.35)  # the first scheduler is gone: its lease lapses
        second = await leased_engine(client, pool_id, fake)
        assert second.replicator.lease.token > first.replicator.lease.token
        assert sorted(second.scheduler.detached) == sorted(prompts)
        resumed = {
            rid: second.attach(rid, prompts[rid], params, 0, [ChoiceProgress(0, got[rid].tokens[0])])
            for rid in prompts
        }
        second.start()
        rest = await asyncio.wait_for(asyncio.gather(*(drain(resumed[rid]) for rid in prompts)), 30)
        await settle(second)
        for rid, more in zip(prompts, rest, strict=True):
            got[rid].tokens[0].extend(more.tokens[0])
        assert_pool_clean(second)
        await second.stop()
        return got

    try:
        got = asyncio.run(go())
        for rid, prompt in prompts.items():
            assert got[rid].tokens[0] == reference(prompt, params.max_tokens, VOCAB), rid
        assert fsck(client, pool_id) == []
    finally:
        client.close()
