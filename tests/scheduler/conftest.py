"""Fixtures for the scheduler tests: block pools of both kinds on a real Redis."""

from __future__ import annotations

import itertools

import pytest
import redis

from pagedserve.scheduler.memory_pool import InMemoryBlockPool
from pagedserve.scheduler.redis_pool import RedisBlockPool

_pool_ids = itertools.count()


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def make_pool(kind: str, client, num_blocks: int, block_size: int, num_cpu_blocks: int = 0):
    if kind == "memory":
        pool = InMemoryBlockPool()
    else:
        pool = RedisBlockPool(client, f"test-{next(_pool_ids)}")
    pool.init(num_blocks, block_size, "epoch-0", "model", num_cpu_blocks)
    return pool


@pytest.fixture(params=["memory", "redis"])
def pool_factory(request, redis_client):
    """Builds pools of the parametrized kind; each is checked by fsck when the test ends."""
    made = []

    def factory(num_blocks: int = 8, block_size: int = 4, num_cpu_blocks: int = 0):
        pool = make_pool(request.param, redis_client, num_blocks, block_size, num_cpu_blocks)
        made.append(pool)
        return pool

    yield factory
    for pool in made:
        assert pool.check() == []
