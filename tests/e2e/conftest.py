"""End-to-end fixtures: the four services as separate processes on a real Redis.

`stack` (session) is the bundled model's stack (see `e2e_harness.Stack`); service logs are
under pytest's temporary directory (`stack-logs*`, kept for the last three runs). After every e2e
test, each stack still running must be idle again (no running or waiting request, no
referenced block) and `pagedserve fsck` must find its pool consistent. Test modules import
helpers from `e2e_harness` (`running_stack`, `metric`, `hf_greedy`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from e2e_harness import LIVE_STACKS, Stack, running_stack


def _redis_db_url(redis_server, db: int) -> str:
    import redis

    url = re.sub(r"/\d+$", f"/{db}", redis_server.url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="session")
def stack(redis_server, bundled_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("stack-logs")
    with running_stack(bundled_model_path, _redis_db_url(redis_server, 1), logs) as s:
        yield s


@pytest.fixture(scope="session")
def fresh_redis_url(redis_server):
    """`fresh_redis_url()`: a Redis database of its own for another stack (2, 3, ...)."""
    counter = iter(range(2, 16))
    return lambda: _redis_db_url(redis_server, next(counter))


@pytest.fixture(autouse=True)
def pools_clean_after_each_test() -> Iterator[None]:
    yield
    for live in list(LIVE_STACKS):
        live.assert_clean()


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.http_url, timeout=120.0) as client:
        yield client
