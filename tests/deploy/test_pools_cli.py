"""`pagedserve pools` and `pagedserve fsck` over every pool, against a real Redis holding
pools registered the way schedulers register them: the info hash, a load hash as the step
script writes it, and a lease key with a TTL."""

from __future__ import annotations

import json
import time

import pytest
import redis

from pagedserve.cli import main as pagedserve
from pagedserve.common.pool_registry import pool_key, register
from pagedserve.scheduler.redis_pool import RedisBlockPool


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def add_pool(
    client, pool_id: str, *, live: bool = True, load: dict | None = None, num_blocks: int = 8
) -> None:
    """Register a pool as its scheduler would, with accounting a real `RedisBlockPool` laid out."""
    pool = RedisBlockPool(client, pool_id)
    pool.init(num_blocks, 16, "epoch-0", "tiny")
    register(client, pool_id, scheduler=f"{pool_id}.pool:50053", executor="127.0.0.1:50054", model="tiny",
             block_size=16, num_blocks=num_blocks, holder=f"host:{pool_id}")  # fmt: skip
    if load is not None:
        client.hset(pool_key(pool_id, "load"), mapping=load)
    if live:
        client.set(pool_key(pool_id, "lease"), f"host:{pool_id}", px=60_000)


def run(capsys, *argv: str) -> tuple[int, str]:
    code = pagedserve(list(argv))
    return code, capsys.readouterr().out


def now_ms() -> int:
    return int(time.time() * 1000)


def test_pools_lists_live_pools_with_their_load(client, redis_url, capsys):
    add_pool(client, "pool-0", load={"running": 3, "waiting": 1, "available": 5, "tokens": 120,
                                     "ms": now_ms() - 2000})  # fmt: skip
    add_pool(client, "pool-1", load={"running": 0, "waiting": 0, "available": 8, "tokens": 0, "ms": now_ms()})
    add_pool(client, "pool-2", live=False, load={"running": 9, "waiting": 9, "available": 0, "tokens": 9,
                                                 "ms": now_ms() - 60_000})  # fmt: skip
    code, out = run(capsys, "pools", "--redis-url", redis_url)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["POOL", "SCHEDULER", "MODEL", "BLOCKS", "RUNNING", "WAITING", "AVAILABLE",
                              "TOKENS", "AGE"]  # fmt: skip
    assert [row.split()[:8] for row in rows] == [
        ["pool-0", "pool-0.pool:50053", "tiny", "8x16", "3", "1", "5", "120"],
        ["pool-1", "pool-1.pool:50053", "tiny", "8x16", "0", "0", "8", "0"],
    ]
    age0, age1 = (float(row.split()[8].rstrip("s")) for row in rows)
    assert 2.0 <= age0 < 12.0 and 0.0 <= age1 < 10.0


def test_pools_all_adds_lapsed_pools(client, redis_url, capsys):
    add_pool(client, "pool-0", load={"running": 1, "waiting": 0, "available": 7, "tokens": 4, "ms": now_ms()})
    add_pool(client, "pool-1", live=False)  # registered, never published a load, lease gone
    code, out = run(capsys, "pools", "--redis-url", redis_url, "--all")
    assert code == 0
    rows = [row.split() for row in out.splitlines()]
    assert rows[0][-1] == "LEASE"
    assert rows[1][0] == "pool-0" and rows[1][-1] == "live"
    assert rows[2] == ["pool-1", "pool-1.pool:50053", "tiny", "8x16", "-", "-", "-", "-", "-", "lapsed"]


def test_pools_json(client, redis_url, capsys):
    written = now_ms() - 1500
    add_pool(client, "pool-0", load={"running": 2, "waiting": 4, "available": 1, "tokens": 64, "ms": written})
    add_pool(client, "pool-1", live=False)
    code, out = run(capsys, "pools", "--redis-url", redis_url, "--json")
    assert code == 0
    (pool,) = json.loads(out)
    age = pool.pop("load_age_s")
    assert 1.5 <= age < 11.5
    assert pool == {
        "pool_id": "pool-0",
        "scheduler": "pool-0.pool:50053",
        "executor": "127.0.0.1:50054",
        "model": "tiny",
        "block_size": 16,
        "num_blocks": 8,
        "holder": "host:pool-0",
        "since": pool["since"],
        "live": True,
        "load": {"running": 2, "waiting": 4, "available": 1, "tokens": 64, "ms": written},
    }
    code, out = run(capsys, "pools", "--redis-url", redis_url, "--json", "--all")
    assert [(p["pool_id"], p["live"], p["load"], p["load_age_s"]) for p in json.loads(out)] == [
        ("pool-0", True, pool["load"], pytest.approx(age, abs=10)),
        ("pool-1", False, None, None),
    ]


def test_pools_when_none_registered(redis_url, capsys):
    assert run(capsys, "pools", "--redis-url", redis_url) == (0, "no live pools registered\n")
    assert run(capsys, "pools", "--redis-url", redis_url, "--json") == (0, "[]\n")


def test_fsck_checks_every_pool_and_fails_on_a_broken_one(client, redis_url, capsys):
    for pool_id in ("pool-0", "pool-1", "pool-2"):
        add_pool(client, pool_id, live=pool_id != "pool-2")
    code, out = run(capsys, "fsck", "--redis-url", redis_url)
    assert code == 0
    assert out.splitlines() == ["pool pool-0: clean", "pool pool-1: clean", "pool pool-2: clean"]

    # Break pool-1: a block that is both free and used, with no block table pointing at it.
    client.hset("pagedserve:{pool-1}:ref", "3", 1)
    code, out = run(capsys, "fsck", "--redis-url", redis_url)
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "pool pool-0: clean" and lines[-2:] == [
        "pool pool-1: 3 problem(s)",
        "pool pool-2: clean",
    ]
    assert set(lines[1:-2]) == {
        "pool pool-1: block 3: is free+used (must be exactly one)",
        "pool pool-1: block 3: ref_cnt 1 but 0 block-table entries",
        "pool pool-1: free 8 + used 1 + cached 0 = 9 != 8",
    }


def test_fsck_one_pool_still_works(client, redis_url, capsys):
    add_pool(client, "pool-0")
    add_pool(client, "pool-1")
    client.hset("pagedserve:{pool-1}:ref", "3", 1)
    assert run(capsys, "fsck", "--redis-url", redis_url, "--pool", "pool-0") == (0, "pool pool-0: clean\n")
    code, out = run(capsys, "fsck", "--redis-url", redis_url, "--pool", "pool-1")
    assert code == 1 and out.splitlines()[-1] == "pool pool-1: 3 problem(s)"
    assert "block 3: is free+used (must be exactly one)" in out.splitlines()


def test_fsck_registered_pool_without_accounting(client, redis_url, capsys):
    """A registry entry whose pool keys are gone is a problem, not a crash."""
    register(client, "ghost", scheduler="ghost:50053", executor="", model="tiny", block_size=16,
             num_blocks=8, holder="h")  # fmt: skip
    code, out = run(capsys, "fsck", "--redis-url", redis_url)
    assert code == 1
    assert out.splitlines() == [
        "pool 'ghost': not found (pagedserve:{ghost}:meta does not exist)",
        "pool ghost: 1 problem(s)",
    ]


def test_fsck_without_pools(redis_url, capsys):
    assert run(capsys, "fsck", "--redis-url", redis_url) == (0, "no pools registered\n")
