"""Fixtures shared by every test package.

`chromium`: Debian's headless chromium driven by Playwright (the dashboard's browser tests).

Redis: a real server for the whole session — a testcontainers container when a Docker
daemon answers, otherwise a local `redis-server` on a free port. A test that needs Redis
and cannot get one fails with the reason; it is never skipped.
"""

from __future__ import annotations

import os

# Triton decides at import time whether to compile or interpret its kernels, so this must be
# set before anything imports triton: on a machine without CUDA the kernels run interpreted.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pagedserve.common.models import BUNDLED_MODEL  # noqa: E402
from pagedserve.common.redis_harness import RedisServer, RedisUnavailable  # noqa: E402


@pytest.fixture(scope="session")
def redis_server():
    try:
        server = RedisServer().start()
    except RedisUnavailable as exc:
        pytest.fail(f"these tests need a real Redis: {exc}")
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of a Redis emptied before the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    if not (BUNDLED_MODEL / "config.json").exists():
        pytest.fail(f"the bundled model is missing at {BUNDLED_MODEL}")
    return str(BUNDLED_MODEL)


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def chromium():
    """A headless Debian chromium under Playwright: no browser download, --no-sandbox as CI runs
    as root. Pages opened on it should use bypass_csp=True: the dashboard forbids eval, which
    Playwright's wait_for_function uses. Module scope: while Playwright's sync API runs, this
    thread has a running event loop, and other modules' asyncio.run() would refuse to start."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"this test needs Debian's chromium at {CHROMIUM} (.ci/run installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield browser
        browser.close()
