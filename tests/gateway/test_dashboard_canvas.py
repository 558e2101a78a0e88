"""The dashboard's canvas grid, used past 16,384 blocks, in headless chromium: a 20,000-block pool
in a real Redis's registry, served by the gateway's real HTTP server, draws each block in the
colour of its state, lights a request's blocks on hover, and logs no console error. (Smaller
pools are one element per block: tests/e2e/test_dashboard.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import redis
from gateway_harness import serving
from test_kv_map import start_request

from pagedserve.common.pool_registry import pool_key, register
from pagedserve.common.redis_harness import free_port
from pagedserve.gateway.routing import PoolRouter
from pagedserve.scheduler.block_pool import StepOps
from pagedserve.scheduler.redis_pool import RedisBlockPool

NUM_BLOCKS = 20_000
# --used-4 and --free of dashboard.css, and --free faded (18% of it over the page's #f8f9fa).
USED_4, FREE, FADED_FREE = (42, 99, 196), (230, 232, 235), (245, 245, 246)


@contextlib.contextmanager
def gateway_over(redis_url: str) -> Iterator[str]:
    """The gateway's HTTP server, routing by the registry, on a loop of its own (Playwright's
    sync API owns this thread's)."""
    ready, stop, box = threading.Event(), threading.Event(), {}

    async def serve() -> None:
        router = PoolRouter([], 0.5, redis_url=redis_url)
        try:
            async with serving(router) as (url, _):
                box["url"] = url
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)
        finally:
            await router.close()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(30), "the gateway did not start"
    try:
        yield box["url"]
    finally:
        stop.set()
        thread.join(10)


# The middle of block b's cell: at 20,000 blocks a cell is 5px and a 1px gap (cellSize in
# dashboard.js).
PIXEL_JS = """(b) => {
  const canvas = document.querySelector('.grid-canvas');
  const per = Math.floor(canvas.width / 6);
  const data = canvas.getContext('2d').getImageData((b % per) * 6 + 2, Math.floor(b / per) * 6 + 2, 1, 1).data;
  return [data[0], data[1], data[2]];
}"""


def pixel(page, block: int) -> tuple[int, ...]:
    return tuple(page.evaluate(PIXEL_JS, block))


def test_a_large_pool_is_drawn_on_a_canvas(redis_url: str, chromium) -> None:
    client = redis.Redis.from_url(redis_url)
    pool = RedisBlockPool(client, "wide")
    pool.init(NUM_BLOCKS, 16, "epoch", "m")
    ops = StepOps()
    children = start_request(ops, 0)  # blocks 0-31 shared by four choices
    for child in children:
        ops.allocate(child, 10)
    pool.apply(ops)
    register(client, "wide", scheduler=f"127.0.0.1:{free_port()}", executor="e", model="m",
             block_size=16, num_blocks=NUM_BLOCKS, holder="h")  # fmt: skip
    client.set(pool_key("wide", "lease"), "h")

    with gateway_over(redis_url) as url:
        page = chromium.new_page(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(f"{url}/dashboard")
        page.wait_for_function("document.querySelector('.grid-canvas')?.height > 100", timeout=20_000)
        assert page.locator(".grid .cell").count() == 0  # no element per block
        per_row, rows = page.evaluate(
            "() => { const c = document.querySelector('.grid-canvas'); return [c.width / 6, c.height / 6]; }"
        )
        assert per_row * rows >= NUM_BLOCKS > per_row * (rows - 1)
        first_free = 32 + 4 * 10
        assert pixel(page, 0) == USED_4 and pixel(page, first_free + 500) == FREE

        page.hover(".requests li")
        page.wait_for_function(f"({PIXEL_JS})({first_free + 500})[0] === {FADED_FREE[0]}", timeout=5_000)
        assert pixel(page, first_free + 500) == FADED_FREE and pixel(page, 0) == USED_4
        assert not errors, errors
        page.close()
