"""Many executor pools behind one gateway, routed by what their caches hold (real processes,
one real Redis): two pools (executor + scheduler each) register in Redis; gateways discover
them there. A shared-prefix load gets a prefix-hit rate within 10% of one pool holding
everything with cache_aware routing, and above round_robin's; a pool whose executor or
scheduler is killed mid-stream loses no request (they move to the other pool, greedy text
identical to `transformers`); a pool started while traffic runs receives requests; a gateway
restarted mid-run routes as before; /v1/kv/map shows every pool. fsck is clean on every
surviving pool after each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_harness import BLOCK_SIZE, ENV, MAX_MODEL_LEN, PAGEDSERVE, hf_greedy
from transformers import AutoTokenizer

from pagedserve.common.grpc_utils import health_check
from pagedserve.common.pool_registry import read_pools
from pagedserve.common.process import ChildProcess, stop_all
from pagedserve.common.redis_connect import connect
from pagedserve.common.redis_harness import free_port, free_ports
from pagedserve.scheduler.fsck import fsck

HOST = "127.0.0.1"
STARTUP_S = 180.0


class PoolsStack:
    """Executor + scheduler pairs (pools) on one Redis, a tokenizer, and gateways by name."""

    def __init__(self, model: str, redis_url: str, log_dir: Path) -> None:
        self.model, self.redis_url, self.log_dir = model, redis_url, log_dir
        self.children: dict[str, ChildProcess] = {}
        self.addresses: dict[str, str] = {}
        self.commands: dict[str, list[str]] = {}
        self.gateways: dict[str, str] = {}  # name -> http url
        self.tokenizer = f"{HOST}:{free_port()}"

    def spawn(self, name: str, kind: str, flags: list[str], address: str) -> None:
        self.commands[name] = [*PAGEDSERVE, kind, *flags]
        self.addresses[name] = address
        self.children[name] = ChildProcess(
            name, self.commands[name], env=ENV, log_path=self.log_dir / f"{name}.log"
        ).start()

    def respawn(self, name: str) -> None:
        self.children[name] = ChildProcess(
            name, self.commands[name], env=ENV, log_path=self.log_dir / f"{name}.log"
        ).start()

    def wait_serving(self, *names: str) -> None:
        deadline = time.monotonic() + STARTUP_S
        for name in names:
            while not health_check(self.addresses[name], timeout=1.0):
                assert self.children[name].poll() is None, f"{name} exited:\n{self.tail(name)}"
                assert time.monotonic() < deadline, f"{name} not SERVING:\n{self.tail(name)}"
                time.sleep(0.1)

    def tail(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else "(no log)"

    def add_pool(self, pool_id: str, *, stall_timeout: float = 3.0) -> None:
        e_port, s_port = free_ports(2)
        self.spawn(
            f"executor-{pool_id}", "executor",
            ["--host", HOST, "--port", str(e_port), "--model", self.model, "--block-size", str(BLOCK_SIZE),
             "--num-kv-blocks", "256", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN)],
            f"{HOST}:{e_port}",
        )  # fmt: skip
        self.spawn(
            f"scheduler-{pool_id}", "scheduler",
            ["--host", HOST, "--port", str(s_port), "--executor", f"{HOST}:{e_port}", "--redis-url",
             self.redis_url, "--pool-id", pool_id, "--stall-timeout", str(stall_timeout), "--lease-ttl", "1.5"],
            f"{HOST}:{s_port}",
        )  # fmt: skip

    def add_gateway(self, name: str, *flags: str) -> str:
        grpc_port, http_port = free_ports(2)
        self.spawn(
            name, "gateway",
            ["--host", HOST, "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--tokenizer",
             self.tokenizer, "--model", self.model, "--stall-timeout", "20", *flags],
            f"{HOST}:{grpc_port}",
        )  # fmt: skip
        self.gateways[name] = f"http://{HOST}:{http_port}"
        return self.gateways[name]

    def kill(self, name: str) -> None:
        child = self.children[name]
        child.signal_group(signal.SIGKILL)
        child.proc.wait(timeout=10)
        child.close()

    def stop(self) -> None:
        children = list(self.children.values())
        stop_all(children, grace=10.0)
        for child in children:
            child.close()

    def live_pools(self) -> list[str]:
        client = connect(self.redis_url)
        try:
            return [p.pool_id for p in read_pools(client)]
        finally:
            client.close()

    def assert_clean(self, pool_ids: list[str]) -> None:
        """Every listed pool idle (no block referenced) and fsck clean."""
        client = connect(self.redis_url, decode_responses=True)
        try:
            deadline = time.monotonic() + 15
            for pool_id in pool_ids:
                while int(client.hlen(f"pagedserve:{{{pool_id}}}:ref")) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert client.hlen(f"pagedserve:{{{pool_id}}}:ref") == 0, f"{pool_id} still holds blocks"
                assert fsck(client, pool_id) == [], pool_id
        finally:
            client.close()


@pytest.fixture(scope="module")
def pools(
    bundled_model_path: str, fresh_redis_url, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PoolsStack]:
    stack = PoolsStack(bundled_model_path, fresh_redis_url(), tmp_path_factory.mktemp("pools-logs"))
    try:
        stack.spawn("tokenizer", "tokenizer", ["--host", HOST, "--port", stack.tokenizer.rsplit(":", 1)[1],
                                               "--model", stack.model], stack.tokenizer)  # fmt: skip
        stack.add_pool("pool-a")
        stack.add_pool("pool-b")
        stack.wait_serving(
            "tokenizer", "executor-pool-a", "executor-pool-b", "scheduler-pool-a", "scheduler-pool-b"
        )
        stack.add_gateway("cache_aware", "--redis-url", stack.redis_url, "--routing", "cache_aware")
        stack.add_gateway("round_robin", "--redis-url", stack.redis_url, "--routing", "round_robin")
        stack.add_gateway("one_pool", "--scheduler", stack.addresses["scheduler-pool-a"])
        stack.wait_serving("cache_aware", "round_robin", "one_pool")
        yield stack
    finally:
        stack.stop()


def _prefix_load(url: str, tag: str, systems: int = 4, users: int = 5) -> float:
    """`systems` shared system prompts, `users` requests each, interleaved (each system prompt's
    first request goes alone, then the rest all at once); the prompt-token hit rate."""
    prompts = {
        s: [f"# {tag} module {s}: " + "helpers for parsing and printing tables. " * 12 + f"\ndef user_{u}_{tag}(x):"
            for u in range(users)]
        for s in range(systems)
    }  # fmt: skip

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[int, int]:
        reply = await client.post(
            "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0}
        )
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        return usage["prompt_tokens"], (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    async def run() -> list[tuple[int, int]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            first = await asyncio.gather(*(one(client, prompts[s][0]) for s in prompts))
            rest = await asyncio.gather(
                *(one(client, p) for u in range(1, users) for p in (prompts[s][u] for s in prompts))
            )
            return [*first, *rest]

    results = asyncio.run(run())
    return sum(c for _, c in results) / sum(p for p, _ in results)


def test_cache_aware_routing_keeps_prefix_hits_of_one_pool(pools: PoolsStack) -> None:
    assert sorted(pools.live_pools()) == ["pool-a", "pool-b"]
    one_pool = _prefix_load(pools.gateways["one_pool"], "single")
    cache_aware = _prefix_load(pools.gateways["cache_aware"], "aware")
    round_robin = _prefix_load(pools.gateways["round_robin"], "robin")
    print(
        f"\nprefix-hit rate: one pool {one_pool:.3f}, cache_aware {cache_aware:.3f}, round_robin {round_robin:.3f}"
    )
    assert one_pool > 0.5
    assert cache_aware >= 0.9 * one_pool
    assert cache_aware > round_robin
    metrics = httpx.get(f"{pools.gateways['cache_aware']}/metrics").text
    routed = {
        m[1]: float(m[2])
        for m in re.finditer(r'pagedserve_pool_requests_routed_total\{pool="([^"]+)"\} (\S+)', metrics)
    }
    assert set(routed) == {"pool-a", "pool-b"} and sum(routed.values()) >= 20
    pools.assert_clean(["pool-a", "pool-b"])


def test_kv_map_shows_every_pool(pools: PoolsStack) -> None:
    """A registry gateway's /v1/kv/map holds every pool, each with its blocks and its scheduler's
    counters; a gateway on one static --scheduler without --kv-map-redis-url says what it needs."""
    url = pools.gateways["cache_aware"]
    body = httpx.get(f"{url}/v1/kv/map", timeout=30).json()
    assert [p["pool_id"] for p in body["pools"]] == ["pool-a", "pool-b"]
    for pool in body["pools"]:
        assert pool["num_blocks"] == 256 and sum(pool["blocks"][1::2]) == 256
        assert pool["stats"] is not None and pool["counts"]["used"] == 0
    one = httpx.get(f"{url}/v1/kv/map", params={"pool": "pool-b"}, timeout=30).json()
    assert [p["pool_id"] for p in one["pools"]] == ["pool-b"]
    static = httpx.get(f"{pools.gateways['one_pool']}/v1/kv/map", timeout=30)
    assert static.status_code == 503 and "--kv-map-redis-url" in static.json()["error"]["message"]


PROMPTS = [
    "def ",
    "class Stack:\n    def __init__(self):\n",
    "import json\n\n\ndef load(path):\n",
    "for i in range(10):\n",
]


@pytest.mark.parametrize("victim", ["executor", "scheduler"])
def test_a_pool_killed_mid_stream_loses_no_request(pools: PoolsStack, victim: str) -> None:
    """16 greedy SSE streams over both pools; once all stream, one pool's executor (or
    scheduler) is killed: its requests move to the other pool and every text is exact."""
    url = pools.gateways["cache_aware"]
    new_tokens = 80
    prompts = [PROMPTS[i % len(PROMPTS)] + f"# {victim} {i}\n" for i in range(16)]
    started: set[int] = set()
    killed = threading.Event()
    doomed = "pool-b"

    routed_at_kill: list[float] = []

    def kill() -> None:
        # Counted before the kill: once the pool's lease lapses, the gateway drops it and its series.
        routed_at_kill.append(_routed(url).get(doomed, 0))
        pools.kill(f"{victim}-{doomed}")

    async def stream(client: httpx.AsyncClient, i: int) -> str:
        body = {
            "prompt": prompts[i],
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        text = ""
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += "".join(c["text"] for c in event["choices"])
                started.add(i)
                if len(started) == len(prompts) and not killed.is_set():
                    killed.set()
                    threading.Thread(target=kill).start()
        return text

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*(stream(client, i) for i in range(len(prompts))))

    before = _metric(url, "pagedserve_migrations_total")
    routed_before = _routed(url).get(doomed, 0)
    try:
        texts = asyncio.run(run())
        assert routed_at_kill and routed_at_kill[0] > routed_before, "the burst was spread over both pools"
        tokenizer = AutoTokenizer.from_pretrained(pools.model)
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        expected = [
            tokenizer.decode(out, skip_special_tokens=True) for out in hf_greedy(pools.model, ids, new_tokens)
        ]
        assert texts == expected
        assert _metric(url, "pagedserve_migrations_total") > before, "requests of the killed pool moved"
        pools.assert_clean(["pool-a"])
    finally:
        # Bring the pool back for the next test, pass or fail (a new executor has a new epoch: the
        # scheduler resets).
        if killed.is_set():
            pools.respawn(f"{victim}-{doomed}")
            pools.wait_serving(f"{victim}-{doomed}", f"scheduler-{doomed}")
            deadline = time.monotonic() + 30
            while "pool-b" not in pools.live_pools():
                assert time.monotonic() < deadline
                time.sleep(0.2)


def _routed(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        m[1]: float(m[2])
        for m in re.finditer(r'pagedserve_pool_requests_routed_total\{pool="([^"]+)"\} (\S+)', text)
    }


def _metric(url: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(match[1]) if match else 0.0


def test_a_new_pool_and_a_restarted_gateway(pools: PoolsStack) -> None:
    """A pool started while the gateway runs gets requests; a restarted gateway routes as before."""
    pools.add_pool("pool-c")
    pools.wait_serving("executor-pool-c", "scheduler-pool-c")
    url = pools.gateways["round_robin"]
    deadline = time.monotonic() + 10
    while True:  # the gateway follows the registry every second
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(3):
                assert (
                    http.post("/v1/completions", json={"prompt": f"x{i}", "max_tokens": 2}).status_code == 200
                )
        routed = httpx.get(f"{url}/metrics").text
        if 'pagedserve_pool_requests_routed_total{pool="pool-c"}' in routed:
            break
        assert time.monotonic() < deadline, routed
    pools.kill("round_robin")
    pools.respawn("round_robin")
    pools.wait_serving("round_robin")
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(6):
            assert http.post("/v1/completions", json={"prompt": f"y{i}", "max_tokens": 2}).status_code == 200
    routed = {
        m[1]: float(m[2])
        for m in re.finditer(
            r'pagedserve_pool_requests_routed_total\{pool="([^"]+)"\} (\S+)', httpx.get(f"{url}/metrics").text
        )
    }
    assert {p for p, n in routed.items() if n > 0} == {"pool-a", "pool-b", "pool-c"}
    pools.assert_clean(["pool-a", "pool-b", "pool-c"])
    with contextlib.suppress(Exception):
        stop_all([pools.children.pop("scheduler-pool-c"), pools.children.pop("executor-pool-c")], grace=10)
