"""The whole stack on a real 3-node Redis Cluster with a password (real processes): two pools whose keys hash
to different nodes, a gateway that finds them through the registry (a key of its own slot)
and routes to both. Greedy text is identical to `transformers`, `pagedserve fsck` over the
cluster finds every pool clean, and each pool's keys sit together on one node while the
pools sit on different ones.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from e2e_harness import ENV, PAGEDSERVE, hf_greedy
from test_pools import HOST, PoolsStack
from transformers import AutoTokenizer

from pagedserve.common.redis_connect import connect
from pagedserve.common.redis_topologies import LocalRedisCluster

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n\ndef walk(path):",
           "# helpers for parsing and printing tables. " * 6 + "\ndef parse(row):"]  # fmt: skip
NEW_TOKENS = 10


def pools_on_two_nodes(url: str) -> list[str]:
    """Two pool ids whose hash tags fall on different cluster nodes."""
    client = connect(url)
    try:
        by_node: dict[str, str] = {}
        for i in range(64):
            pool_id = f"pool-{i}"
            node = client.get_node_from_key(f"pagedserve:{{{pool_id}}}:meta").name
            by_node.setdefault(node, pool_id)
            if len(by_node) == 2:
                return sorted(by_node.values())
    finally:
        client.close()
    raise AssertionError("no two pool ids on different nodes among 64")


@pytest.fixture(scope="module")
def cluster_stack(bundled_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    with LocalRedisCluster(masters=3, password="pagedserve-cluster") as cluster:
        pool_ids = pools_on_two_nodes(cluster.url)
        stack = PoolsStack(bundled_model_path, cluster.url, tmp_path_factory.mktemp("cluster-logs"))
        try:
            stack.spawn("tokenizer", "tokenizer", ["--host", HOST, "--port", stack.tokenizer.rsplit(":", 1)[1],
                                                   "--model", stack.model], stack.tokenizer)  # fmt: skip
            for pool_id in pool_ids:
                stack.add_pool(pool_id)
            stack.wait_serving(
                "tokenizer", *(f"{kind}-{p}" for p in pool_ids for kind in ("executor", "scheduler"))
            )
            stack.add_gateway("gateway", "--redis-url", cluster.url, "--routing", "round_robin")
            stack.add_gateway("aware", "--redis-url", cluster.url, "--routing", "cache_aware")
            stack.wait_serving("gateway", "aware")
            yield cluster, stack, pool_ids
        finally:
            stack.stop()


def test_two_pools_on_a_redis_cluster(cluster_stack) -> None:
    cluster, stack, pool_ids = cluster_stack
    assert sorted(stack.live_pools()) == pool_ids
    url = stack.gateways["gateway"]

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            replies = await asyncio.gather(
                *(
                    client.post(
                        "/v1/completions",
                        json={"prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
                    )
                    for p in PROMPTS
                )  # fmt: skip
            )
        for reply in replies:
            assert reply.status_code == 200, reply.text
        return [reply.json()["choices"][0]["text"] for reply in replies]

    texts = asyncio.run(run())
    tokenizer = AutoTokenizer.from_pretrained(stack.model)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = [
        tokenizer.decode(out, skip_special_tokens=True) for out in hf_greedy(stack.model, ids, NEW_TOKENS)
    ]
    assert texts == expected

    metrics = httpx.get(f"{url}/metrics").text
    routed = {
        m[1]: float(m[2])
        for m in re.finditer(r'pagedserve_pool_requests_routed_total\{pool="([^"]+)"\} (\S+)', metrics)
    }
    assert sorted(p for p, n in routed.items() if n > 0) == pool_ids, metrics

    # cache_aware scores the pools with one pipelined read that spans both nodes: the long
    # prompt again goes where its blocks are cached, and says so.
    aware = stack.gateways["aware"]
    body = {"prompt": PROMPTS[-1], "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{aware}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == expected[-1]
    assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, reply.json()
    metrics = httpx.get(f"{aware}/metrics").text
    predicted = re.findall(
        r'pagedserve_pool_predicted_prefix_hit_tokens(?:_total)?\{pool="[^"]+"\} (\S+)', metrics
    )
    assert sum(float(v) for v in predicted) > 0, metrics

    stack.assert_clean(pool_ids)
    done = subprocess.run([*PAGEDSERVE, "fsck", "--redis-url", cluster.url], capture_output=True, text=True,
                          env=ENV, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for pool_id in pool_ids:
        assert f"pool {pool_id}: clean" in done.stdout, done.stdout

    # Each pool on one node, the two pools on two nodes; the registry is a key of its own.
    holders: dict[str, set[int]] = {p: set() for p in pool_ids}
    for port, keys in cluster.node_keys().items():
        for key in keys:
            for pool_id in pool_ids:
                if key.startswith(f"pagedserve:{{{pool_id}}}:"):
                    holders[pool_id].add(port)
    assert all(len(nodes) == 1 for nodes in holders.values()), holders
    assert len(set().union(*holders.values())) == 2, holders
    assert sum("pagedserve:pools" in keys for keys in cluster.node_keys().values()) == 1
