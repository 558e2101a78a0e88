"""`GET /v1/kv/map` and `/dashboard` through the gateway's real HTTP server: a pool found in the
registry of a real Redis, the `pool` filter, the API key, and the answer when there is no Redis.
(The map against live services, in a browser, is tests/e2e/test_dashboard.py.)"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
from pathlib import Path

import httpx
import redis
import redis.asyncio
from gateway_fakes import FakeScheduler
from gateway_harness import assert_error, run, serving

from pagedserve.common.pool_registry import pool_key, register
from pagedserve.common.redis_harness import free_port
from pagedserve.gateway.dashboard import FILES, STATIC
from pagedserve.gateway.kv_map import expand_delta_runs, expand_runs
from pagedserve.gateway.routing import PoolRouter
from pagedserve.scheduler.block_pool import StepOps
from pagedserve.scheduler.redis_pool import RedisBlockPool


def registered_pool(url: str, pool_id: str) -> RedisBlockPool:
    """A live pool in the registry (its scheduler address answers nothing) holding one request
    of two choices that share two blocks."""
    client = redis.Redis.from_url(url)
    pool = RedisBlockPool(client, pool_id)
    pool.init(32, 4, "epoch", "tiny")
    ops = StepOps()
    for seq_id, index in (("r", -1), ("r.0", 0), ("r.1", 1)):
        params = json.dumps({"rid": "cmpl-1", "i": index, "s": {}})
        ops.save(seq_id, prompt_token_ids=[1], params_json=params, priority=0, status="2",
                 num_computed_tokens=5, output_token_ids=[])  # fmt: skip
    ops.allocate("r", 2)
    ops.fork("r", "r.0")
    ops.fork("r", "r.1")
    ops.drop("r")
    ops.allocate("r.1", 1)
    pool.apply(ops)
    register(client, pool_id, scheduler=f"127.0.0.1:{free_port()}", executor="e", model="tiny",
             block_size=4, num_blocks=32, holder="h")  # fmt: skip
    client.set(pool_key(pool_id, "lease"), "h")
    return pool


def test_map_of_a_registry_pool(redis_url: str) -> None:
    registered_pool(redis_url, "pool-a")

    async def scenario() -> None:
        router = PoolRouter([], 0.5, redis_url=redis_url)
        try:
            async with serving(router) as (url, _), httpx.AsyncClient(base_url=url) as http:
                reply = await http.get("/v1/kv/map", headers={"accept-encoding": "identity"})
                assert reply.status_code == 200, reply.text
                body = reply.json()
                assert body["object"] == "kv_map" and [p["pool_id"] for p in body["pools"]] == ["pool-a"]
                pool = body["pools"][0]
                assert (pool["num_blocks"], pool["block_size"], pool["model"]) == (32, 4, "tiny")
                assert expand_runs(pool["blocks"]) == [2, 2, 1] + [0] * 29
                assert pool["counts"] == {"free": 29, "used": 3, "cached": 0, "swapped": 0}
                assert pool["cpu"] == {"num_blocks": 0, "blocks": []}
                tables = {s["seq_id"]: expand_delta_runs(s["block_table"]) for s in pool["sequences"]}
                assert tables == {"r.0": [0, 1], "r.1": [0, 1, 2]}
                assert {s["request_id"] for s in pool["sequences"]} == {"cmpl-1"}
                assert pool["stats"] is None  # its scheduler does not answer; the blocks still show
                assert (await http.get("/v1/kv/map", params={"pool": "pool-a"})).json()["pools"] == [pool]
                missing = await http.get("/v1/kv/map", params={"pool": "pool-z"})
                assert_error(missing, 404, "pool 'pool-z' is not routed to", param="pool")
        finally:
            await router.close()

    run(scenario)


def test_without_redis_the_map_says_which_flag() -> None:
    async def scenario() -> None:
        async with serving(FakeScheduler(["ok"])) as (url, _), httpx.AsyncClient(base_url=url) as http:
            reply = await http.get("/v1/kv/map")
            assert_error(reply, 503, "--kv-map-redis-url")
            assert "--redis-url" in reply.json()["error"]["message"]
            page = await http.get("/dashboard")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]

    run(scenario)


def test_dashboard_files_and_the_api_key() -> None:
    async def scenario() -> None:
        async with (
            serving(FakeScheduler(["ok"]), api_key="s3cret") as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            assert_error(await http.get("/v1/kv/map"), 401, "API key")
            authed = await http.get("/v1/kv/map", headers={"authorization": "Bearer s3cret"})
            assert authed.status_code == 503  # past the key; no Redis to read
            page = await http.get("/dashboard")  # the page holds no data: it loads, then asks
            assert page.status_code == 200 and 'id="keyform"' in page.text
            assert "default-src 'self'" in page.headers["content-security-policy"]
            assert "/dashboard/dashboard.js" in page.text and "/dashboard/dashboard.css" in page.text
            for name, kind in [("dashboard.css", "css")] + [
                (n, "javascript") for n in FILES if n.endswith(".js")
            ]:
                reply = await http.get(f"/dashboard/{name}")
                assert reply.status_code == 200 and kind in reply.headers["content-type"]
            script = (await http.get("/dashboard/dashboard.js")).text
            assert all(f'from "./{n}"' in script for n in ("cells.js", "chart.js"))
            assert_error(await http.get("/dashboard/secrets.txt"), 404, "no such dashboard file")
            assert (await http.get("/dashboard/..%2Fhttp_api.py")).status_code == 404

    run(scenario)


def test_pool_maps_answer_in_one_round_trip(redis_url: str) -> None:
    """Every pool's map is one EVAL, all pipelined (no SCRIPT EXISTS / LOAD round trip first)."""
    from pagedserve.gateway.kv_map import read_pool_maps

    for pool_id in ("p1", "p2", "p3"):
        registered_pool(redis_url, pool_id)
    admin = redis.Redis.from_url(redis_url)
    admin.config_resetstat()

    async def go():
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await read_pool_maps(client, ["p1", "p2", "p3"])
        finally:
            await client.aclose()

    maps = asyncio.run(go())
    assert all(m is not None and m.used == 3 for m in maps.values())
    stats = admin.info("commandstats")
    assert stats["cmdstat_eval"]["calls"] == 3
    assert "cmdstat_evalsha" not in stats and "cmdstat_script" not in stats


def test_page_files_ship_in_the_wheel() -> None:
    """Every file the gateway serves exists and is package data (an installed wheel has it)."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1]
    globs = json.loads(re.search(r'^"pagedserve\.gateway" = (\[.*\])$', section, re.MULTILINE).group(1))
    for file_name, _ in FILES.values():
        assert (STATIC / file_name).is_file()
        assert any(fnmatch.fnmatch(f"static/{file_name}", g) for g in globs), file_name
