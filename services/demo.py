"""`pagedserve demo` (and `make demo`): the whole stack, a few real prompts, then shut down.

Starts `pagedserve up` with the bundled model on free ports, sends one streamed completion
over the gRPC SDK, one `n=3` sampled completion, and one chat completion over the
OpenAI-compatible HTTP API, prints the answers and the KV-cache metrics, and stops every
process it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from pagedserve.common.grpc_utils import health_check
from pagedserve.common.models import default_model
from pagedserve.common.redis_harness import free_ports

KV_METRICS = (
    "pagedserve_kv_blocks_total",
    "pagedserve_kv_blocks_used",
    "pagedserve_kv_blocks_cached",
    "pagedserve_requests_running",
    "pagedserve_requests_waiting",
    "pagedserve_prefix_cache_hit_tokens_total",
    "pagedserve_prefix_cache_query_tokens_total",
    "pagedserve_preemptions_total",
    "pagedserve_generated_tokens_total",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=default_model(), help="local path or hub id (default: %(default)s)"
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0, metavar="SECONDS")


def _start_stack(model: str, log_dir: str) -> tuple[subprocess.Popen, str, str]:
    names = ("http", "grpc", "tokenizer", "scheduler", "executor")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    cmd = [
        sys.executable, "-m", "pagedserve.cli", "up", "--model", model, "--log-dir", log_dir,
        "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
        "--tokenizer-port", str(ports["tokenizer"]), "--scheduler-port", str(ports["scheduler"]),
        "--executor-port", str(ports["executor"]),
    ]  # fmt: skip
    print("$ pagedserve up --model", model, flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)
    return proc, f"127.0.0.1:{ports['grpc']}", f"http://127.0.0.1:{ports['http']}"


def _wait_ready(proc: subprocess.Popen, grpc_address: str, http_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pagedserve up exited with code {proc.returncode} during start-up")
        if health_check(grpc_address, timeout=0.5):
            try:
                if httpx.get(f"{http_url}/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"the stack was not ready within {timeout:.0f}s")


def _stop_stack(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run_prompts(grpc_address: str, http_url: str) -> None:
    from pagedserve.client import Client

    with Client(grpc_address, timeout=120) as client:
        prompt = "def fibonacci(n):\n"
        print(f"\n== streamed (gRPC SDK), greedy, 48 tokens\n{prompt}", end="", flush=True)
        for delta in client.stream(prompt, max_tokens=48, temperature=0):
            for choice in delta.choices:
                print(choice.text, end="", flush=True)
        print()

        prompt = "import os\n"
        result = client.generate(prompt, max_tokens=32, n=3, temperature=0.8, seed=7)
        print(f"\n== n=3 (gRPC SDK), temperature 0.8, seed 7: {result.usage}")
        for choice in result.choices:
            print(f"-- choice {choice.index} ({choice.finish_reason})\n{prompt}{choice.text}")

    body = {
        "messages": [
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Write a function that returns the square of x."},
        ],
        "max_tokens": 48,
        "temperature": 0,
    }
    reply = httpx.post(f"{http_url}/v1/chat/completions", json=body, timeout=120).json()
    print("\n== chat (OpenAI-compatible HTTP, POST /v1/chat/completions)")
    print(reply["choices"][0]["message"]["content"])
    print(f"usage: {reply['usage']}")

    metrics = httpx.get(f"{http_url}/metrics", timeout=10).text
    print("\n== KV cache and scheduler (GET /metrics)")
    for line in metrics.splitlines():
        if line.split(" ")[0] in KV_METRICS:
            print(f"  {line}")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="pagedserve-demo-") as log_dir:
        proc, grpc_address, http_url = _start_stack(args.model, log_dir)
        try:
            _wait_ready(proc, grpc_address, http_url, args.startup_timeout)
            print(f"\nready: gRPC {grpc_address}, HTTP {http_url}", flush=True)
            _run_prompts(grpc_address, http_url)
        except Exception as exc:
            print(f"demo failed: {exc}; service logs follow", file=sys.stderr)
            for name in sorted(os.listdir(log_dir)):
                with open(os.path.join(log_dir, name), errors="replace") as f:
                    print(f"--- {name}\n{f.read()[-2000:]}", file=sys.stderr)
            return 1
        finally:
            _stop_stack(proc)
    print("\nstopped every process")
    return 0
