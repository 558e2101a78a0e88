"""`redis_connect`: every `--redis-url` form reaches a real Redis of that kind — a
password-protected node, a TLS-only node (`rediss://` with a CA), the master behind a
Sentinel — and the block store, fsck, the pool registry and the CLIs work through it. A
wrong password or a missing CA is a one-line start-up error that never shows the password.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys

import pytest
import redis

from pagedserve.common.certs import make_certs
from pagedserve.common.pool_registry import read_pools, read_pools_async, register
from pagedserve.common.redis_connect import (
    RedisSetupError,
    check,
    check_async,
    connect,
    connect_async,
    off_the_command_line,
    parse_redis_url,
    redact,
    url_arg,
)
from pagedserve.common.redis_topologies import LocalRedis, LocalRedisCluster, LocalRedisSentinel
from pagedserve.scheduler.block_pool import StepOps
from pagedserve.scheduler.fsck import fsck
from pagedserve.scheduler.redis_pool import RedisBlockPool


def test_url_forms() -> None:
    t = parse_redis_url("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26380/mymaster/2?sentinel_password=s")
    assert (t.kind, t.nodes, t.service_name, t.db) == (
        "sentinel",
        (("10.0.0.1", 26379), ("10.0.0.2", 26380)),
        "mymaster",
        2,
    )
    assert (t.password, t.sentinel_password, t.tls) == ("pw", "s", False)
    t = parse_redis_url("rediss+cluster://user:pa%40ss@a:7000,b:7001?ssl_ca_certs=/ca.pem")
    assert (t.kind, t.nodes, t.username, t.password, t.tls) == (
        "cluster",
        (("a", 7000), ("b", 7001)),
        "user",
        "pa@ss",
        True,
    )
    assert t.tls_options == {"ssl_ca_certs": "/ca.pem"}
    assert parse_redis_url("rediss://:pw@h:6380/0").kind == "single"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h:1", "the scheme must be one of"),
        ("redis+sentinel://h:26379", "ends in /service_name"),
        ("redis+cluster://h:7000/3", "only database 0"),
        ("redis+cluster://h", "'h' is not host:port"),
        ("redis+cluster://:secret@h:7000?ssl_ca=/x", "unknown option(s) ssl_ca"),
        ("redis+cluster://h:7000?ssl_ca_certs=/x", "TLS options need rediss+cluster://"),
        (
            "redis+sentinel://h:26379/m?ssl_ca_certs=/x",
            "unknown option(s) ssl_ca_certs (known: sentinel_password)",
        ),
    ],
)
def test_bad_urls_name_the_part(url: str, says: str) -> None:
    with pytest.raises(RedisSetupError, match=r".*") as err:
        parse_redis_url(url)
    assert says in str(err.value) and "secret" not in str(err.value)


def test_redact() -> None:
    assert redact("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("redis://u:hunter2@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


def test_a_url_with_a_password_travels_in_the_environment(monkeypatch) -> None:
    plain = "redis://h:6379/0"
    assert off_the_command_line(plain) == (plain, {})
    for secret in (
        "redis://:hunter2@h:6379/0",
        "redis+sentinel://:hunter2@h:26379/mymaster",
        "redis+sentinel://h:26379/mymaster?sentinel_password=hunter2",
        "rediss+cluster://u:hunter2@h:7000",
    ):
        arg, env = off_the_command_line(secret)
        assert "hunter2" not in arg and env == {"PAGEDSERVE_REDIS_URL": secret}
        monkeypatch.setenv("PAGEDSERVE_REDIS_URL", secret)
        assert url_arg(arg) == secret
    assert url_arg(plain) == plain
    monkeypatch.delenv("PAGEDSERVE_REDIS_URL")
    with pytest.raises(
        argparse.ArgumentTypeError, match="environment variable 'PAGEDSERVE_REDIS_URL' is not set"
    ):
        url_arg("env:PAGEDSERVE_REDIS_URL")


def exercise(url: str, pool_id: str) -> None:
    """The block store (init, a step that allocates and frees), fsck and the registry, sync
    and asyncio, all through `url`."""
    client = connect(url)
    pool = RedisBlockPool(client, pool_id)
    pool.init(num_blocks=8, block_size=4, epoch="e1", model="m")
    ops = StepOps()
    ops.allocate("r1", 3)
    assert pool.apply(ops).counts.num_used == 3
    assert fsck(client, pool_id) == []
    ops = StepOps()
    ops.free("r1")
    assert pool.apply(ops).counts.num_free == 8
    client.set(f"pagedserve:{{{pool_id}}}:lease", "me", px=10_000)
    register(
        client, pool_id, scheduler="s:1", executor="e:1", model="m", block_size=4, num_blocks=8, holder="me"
    )
    assert [p.pool_id for p in read_pools(client)] == [pool_id]
    assert fsck(client, pool_id) == []
    client.close()

    async def read_async() -> list[str]:
        aclient = connect_async(url)
        try:
            return [p.pool_id for p in await read_pools_async(aclient)]
        finally:
            await aclient.aclose()

    assert asyncio.run(read_async()) == [pool_id]


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pagedserve.cli", *argv], capture_output=True, text=True, timeout=60
    )


def test_password_protected_redis() -> None:
    with LocalRedis(password="hunter2") as server:
        exercise(server.url, "pw-pool")
        done = cli("fsck", "--redis-url", server.url)
        assert done.returncode == 0 and "pool pw-pool: clean" in done.stdout, done.stdout + done.stderr
        # the same, the URL named by an environment variable (not on the command line)
        done = subprocess.run(
            [sys.executable, "-m", "pagedserve.cli", "fsck", "--redis-url", "env:TEST_URL"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "TEST_URL": server.url},
        )  # fmt: skip
        assert done.returncode == 0 and "pool pw-pool: clean" in done.stdout, done.stdout + done.stderr
        done = cli("fsck", "--redis-url", "env:PAGEDSERVE_NOT_SET_ANYWHERE")
        assert done.returncode == 2 and "'PAGEDSERVE_NOT_SET_ANYWHERE' is not set" in done.stderr, done.stderr

        wrong = server.url.replace("hunter2", "wrong")
        with pytest.raises(RedisSetupError) as err:
            check(connect(wrong), wrong)
        assert "refused the credentials" in str(err.value) and "wrong" not in str(err.value)
        none = server.url.replace(":hunter2@", "")
        with pytest.raises(RedisSetupError, match="requires a password"):
            check(connect(none), none)
        done = cli("pools", "--redis-url", wrong)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "refused the credentials" in done.stderr and "wrong" not in done.stderr
        assert "Traceback" not in done.stderr


def test_rediss_with_a_ca(tmp_path) -> None:
    files = make_certs(tmp_path)
    with LocalRedis(tls=(files.ca, files.cert, files.key)) as server:
        assert server.url.startswith("rediss://") and "ssl_ca_certs=" in server.url
        exercise(server.url, "tls-pool")
        untrusted = server.url.split("?")[0]  # no CA: the server's certificate is not trusted
        with pytest.raises(RedisSetupError, match="TLS to Redis"):
            check(connect(untrusted), untrusted)
        plain = untrusted.replace("rediss://", "redis://")  # the plain port is closed
        with pytest.raises(redis.exceptions.ConnectionError):
            check(connect(plain, socket_timeout=2, socket_connect_timeout=2), plain)


def test_sentinel_url() -> None:
    with LocalRedisSentinel(service_name="pagedserve", password="s3") as topo:
        assert topo.url.startswith("redis+sentinel://:s3@127.0.0.1:")
        exercise(topo.url, "sentinel-pool")
        # The keys are on the master Sentinel names.
        master = redis.Redis(port=topo.master_port, password="s3")
        assert master.exists("pagedserve:{sentinel-pool}:meta") == 1
        master.close()
        done = cli("fsck", "--redis-url", topo.url)
        assert done.returncode == 0 and "pool sentinel-pool: clean" in done.stdout, done.stdout + done.stderr
        done = cli("pools", "--redis-url", topo.url, "--json")
        assert done.returncode == 0 and '"pool_id": "sentinel-pool"' in done.stdout, done.stdout + done.stderr


def test_cluster_url_with_a_password() -> None:
    """The block store, fsck and the registry on a 3-node cluster (the whole stack on one:
    tests/e2e/test_redis_cluster.py); a wrong or missing password is a setup error, sync and
    asyncio, before any command."""
    with LocalRedisCluster(masters=3, password="c1uster") as cluster:
        assert cluster.url.startswith("redis+cluster://:c1uster@127.0.0.1:")
        exercise(cluster.url, "cluster-pool")
        holders = [
            port for port, keys in cluster.node_keys().items() if "pagedserve:{cluster-pool}:meta" in keys
        ]
        assert len(holders) == 1
        done = cli("fsck", "--redis-url", cluster.url)
        assert done.returncode == 0 and "pool cluster-pool: clean" in done.stdout, done.stdout + done.stderr

        wrong = cluster.url.replace("c1uster", "wrong")
        with pytest.raises(RedisSetupError, match="refused the credentials") as err:
            check(connect(wrong), wrong)
        assert "wrong" not in str(err.value)

        async def check_wrong() -> None:
            client = connect_async(wrong)
            try:
                await check_async(client, wrong)
            finally:
                await client.aclose()

        with pytest.raises(RedisSetupError, match="refused the credentials"):
            asyncio.run(check_wrong())


def test_rediss_cluster_url(tmp_path) -> None:
    """A TLS-only cluster (client links and the cluster bus): `rediss+cluster://` with a CA."""
    files = make_certs(tmp_path)
    with LocalRedisCluster(masters=3, tls=(files.ca, files.cert, files.key)) as cluster:
        assert cluster.url.startswith("rediss+cluster://127.0.0.1:") and "ssl_ca_certs=" in cluster.url
        exercise(cluster.url, "tls-cluster-pool")
        untrusted = cluster.url.split("?")[0]
        with pytest.raises(RedisSetupError, match="TLS to Redis"):
            check(connect(untrusted), untrusted)
