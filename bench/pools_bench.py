"""Two pools vs one, and the gateway's routing policies, on a shared-prefix trace.

    python -m pagedserve.bench.pools_bench [--model M] [--systems 6] [--users 8] [--rate 8]

`pagedserve up --pools 2` runs two executor + scheduler pairs on one Redis. Beside its own
gateway (cache_aware) the bench starts gateways with `--routing least_loaded` and
`--routing round_robin` on the same pools, and one that drives pool 0 alone (`--scheduler`):
the "one pool holding everything" baseline. Each gets the same kind of trace — `--systems`
system prompts of `--system-len` tokens, `--users` requests each with their own
`--user-len` tokens, interleaved, Poisson arrivals at `--rate` requests/s — with system
prompts of its own (fresh random ids), so no run profits from another's cache. Reported per
run: prompt tokens served from the prefix caches over those looked up (from the pools'
Stats, summed), prefill tokens computed, TTFT p50/p99 and output tok/s. One run; the ratios
are the result, the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pagedserve.bench.http_load import run_http_load
from pagedserve.bench.metrics import summarize
from pagedserve.bench.workload import BenchRequest
from pagedserve.common.grpc_utils import health_check
from pagedserve.common.models import default_model
from pagedserve.common.redis_harness import free_ports

VOCAB = 4096


def trace(
    systems: int, users: int, system_len: int, user_len: int, output_len: int, seed: int
) -> list[BenchRequest]:
    """Interleaved: user u of every system prompt before user u + 1 of any."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(system_len)] for _ in range(systems)]
    return [
        BenchRequest(prompts[s] + [rng.randrange(3, VOCAB) for _ in range(user_len)], output_len)
        for _ in range(users)
        for s in range(systems)
    ]


def _scheduler_totals(http_url: str) -> tuple[float, float]:
    """(prefix-cache hit tokens, looked-up tokens) over every pool behind a gateway."""
    import httpx

    text = httpx.get(f"{http_url}/metrics", timeout=10).text

    def value(name: str) -> float:
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(match[1]) if match else 0.0

    return value("pagedserve_prefix_cache_hit_tokens_total"), value(
        "pagedserve_prefix_cache_query_tokens_total"
    )


class Gateway:
    def __init__(self, name: str, flags: list[str], tokenizer: str, model: str, log_dir: Path) -> None:
        self.name = name
        self.grpc, self.http = free_ports(2)
        self.url = f"http://127.0.0.1:{self.http}"
        log = open(log_dir / f"gateway-{name}.log", "w")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.cli", "gateway", "--host", "127.0.0.1", "--grpc-port", str(self.grpc),
             "--http-port", str(self.http), "--tokenizer", tokenizer, "--model", model, *flags],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()

    def wait(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not health_check(f"127.0.0.1:{self.grpc}", timeout=1.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway {self.name} did not start")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--systems", type=int, default=5
    )  # odd: round_robin over 2 pools does not keep each on one
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=256)
    parser.add_argument("--user-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson)")
    parser.add_argument("--num-kv-blocks", type=int, default=512, help="blocks per pool")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    model = args.model or str(default_model())
    log_dir = Path(tempfile.mkdtemp(prefix="pagedserve-pools-bench-"))
    names = ("http", "grpc", "tokenizer", "scheduler", "executor")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    up_cmd = [sys.executable, "-m", "pagedserve.cli", "up", "--model", model, "--pools", "2",
              "--num-kv-blocks", str(args.num_kv_blocks), "--max-model-len", "1024", "--log-dir", str(log_dir),
              *(a for n, p in ports.items() for a in (f"--{n}-port", str(p)))]  # fmt: skip
    up_log = open(log_dir / "up.log", "w")  # noqa: SIM115
    up = subprocess.Popen(up_cmd, stdout=up_log, stderr=subprocess.STDOUT, start_new_session=True)
    gateways: list[Gateway] = []
    try:
        deadline = time.monotonic() + 300
        while not health_check(f"127.0.0.1:{ports['grpc']}", timeout=1.0):
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pagedserve up failed: see {log_dir}/up.log")
            time.sleep(0.5)
        redis_url = "redis://{}/0".format(
            re.search(r"redis is serving at (\S+) ", (log_dir / "up.log").read_text())[1]
        )
        tokenizer = f"127.0.0.1:{ports['tokenizer']}"
        runs = {"two pools, cache_aware": f"http://127.0.0.1:{ports['http']}"}
        for name, flags in (
            ("least_loaded", ["--redis-url", redis_url, "--routing", "least_loaded"]),
            ("round_robin", ["--redis-url", redis_url, "--routing", "round_robin"]),
            ("one", ["--scheduler", f"127.0.0.1:{ports['scheduler']}"]),
        ):
            gateways.append(Gateway(name, flags, tokenizer, model, log_dir))
        for g in gateways:
            g.wait()
        runs["two pools, least_loaded"] = gateways[0].url
        runs["two pools, round_robin"] = gateways[1].url
        runs["one pool (pool 0 alone)"] = gateways[2].url
        results = {}
        for i, (name, url) in enumerate(runs.items()):
            requests = trace(
                args.systems, args.users, args.system_len, args.user_len, args.output_len, seed=100 + i
            )
            hit0, query0 = _scheduler_totals(url)
            load = asyncio.run(run_http_load(url, requests, rate=args.rate, seed=i))
            hit1, query1 = _scheduler_totals(url)
            s = summarize(load.records)
            hits, queried = hit1 - hit0, query1 - query0
            results[name] = {
                "prefix_hit_rate": hits / queried if queried else 0.0,
                "prefill_tokens_computed": queried - hits,
                "ttft_p50_ms": s.ttft.p50 * 1e3,
                "ttft_p99_ms": s.ttft.p99 * 1e3,
                "output_tok_s": s.output_throughput,
                "failed": s.num_failed,
            }
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    finally:
        for g in gateways:
            g.stop()
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
        up_log.close()
    print(
        f"\n{args.systems} system prompts of {args.system_len} tokens x {args.users} users "
        f"(+{args.user_len} own tokens, {args.output_len} out), Poisson {args.rate}/s; {args.num_kv_blocks} "
        "blocks per pool\n"
    )
    print("| run | prefix-hit rate | prefill tokens computed | TTFT p50 ms | TTFT p99 ms | output tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['prefix_hit_rate']:.1%} | {r['prefill_tokens_computed']:.0f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['output_tok_s']:.0f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
