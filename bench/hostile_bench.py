"""One hostile client beside many normal streams: does the gateway keep its latency?

    python -m pagedserve.bench.hostile_bench [--url http://127.0.0.1:8000] [--streams 200]
    pagedserve bench --hostile [--streams 200] [--output-len 8]

Without --url it starts a stack (`pagedserve up` on the bundled model) and stops it after. Two
waves of --streams concurrent streaming completions (greedy, ignore_eos, --output-len tokens
each): first alone, then while one client keeps sending, one after another, the largest
requests the gateway's limits allow (the defaults of `GatewayConfig`, or the flags):

- n = --max-n choices, each with --max-stop-strings stop strings of --max-stop-chars in all;
- a body just under --max-request-bytes (the rest of it a field the gateway ignores);
- a body nested --max-json-depth levels deep;
- the largest prompt: max_model_len - 1 token ids (the stack's, from /v1/models);
- the deepest JSON schema accepted (`structured_outputs.json`, nested `MAX_SCHEMA_DEPTH` levels),
  a new one each time (a schema's grammar is cached by its text);
- and just past the limits: n = 2^40 (400), a JSON schema nested 800 levels (400; its grammar
  would take about a minute to build) and a Content-Length over the byte limit (413, unread).

The attacker is a process of its own, so that building and sending its bodies does not share
this process's interpreter with the streams being timed. The wave runs alone once more after
the attack, so that a machine getting busier or quieter meanwhile favours neither side.
Printed per wave: the normal streams' TTFT p50 and p99 (first token event after the request
was sent) and the wave's total time (first sent to last finished); then the ratio line,
attacked / alone (the mean of the two alone waves' figures). One run on a shared machine: a
ratio, not an assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

from pagedserve.bench import doc_sections
from pagedserve.bench.metrics import percentile
from pagedserve.common.structured import MAX_SCHEMA_DEPTH
from pagedserve.gateway.config import RequestLimits

BEGIN, END = doc_sections.markers("hostile")


class Wave(NamedTuple):
    ttfts: list[float]  # seconds, one per normal stream that completed
    total: float  # first request sent to last stream finished
    failed: int

    @property
    def ttft_p50(self) -> float:
        return percentile(self.ttfts, 50)

    @property
    def ttft_p99(self) -> float:
        return percentile(self.ttfts, 99)


@dataclass(frozen=True, slots=True)
class AttackSpec:
    url: str
    max_model_len: int
    limits: RequestLimits
    attack_tokens: int  # max_tokens of each of the max-n choices


def attack_bodies(spec: AttackSpec) -> list[tuple[str, bytes | list[bytes]]]:
    """(name, JSON body) of each request at the limits; built once, sent again and again (a list:
    versions sent in turn)."""
    limits = spec.limits
    stop_len = max(limits.max_stop_chars // limits.max_stop_strings, 1)
    stops = ["~" * (stop_len - 1) + "!"] * limits.max_stop_strings  # never in the model's text
    most = {"prompt": "x", "n": limits.max_n, "max_tokens": spec.attack_tokens, "ignore_eos": True}
    base = {"prompt": "x", "max_tokens": 1}
    shell = json.dumps({**base, "user": ""}).encode()
    padding = limits.max_request_bytes - len(shell) - 16
    deep: object = []
    for _ in range(limits.max_json_depth - 2):  # the body object and the list itself make the rest
        deep = [deep]
    rng = random.Random(0)
    prompt = [rng.randrange(3, 1000) for _ in range(spec.max_model_len - 1)]
    levels = (MAX_SCHEMA_DEPTH - 1) // 2  # each level: an object and its properties
    deep_schema = nested_schema(800)
    bodies = {
        f"n={limits.max_n} x {limits.max_stop_strings} stops": {**most, "stop": stops},
        f"{limits.max_request_bytes // 1024} KiB body": {**base, "user": "a" * padding},
        f"JSON depth {limits.max_json_depth}": {**base, "metadata": deep},
        f"{len(prompt)}-token prompt": {"prompt": prompt, "max_tokens": 1},
        "n=2^40 (over)": {**base, "n": 2**40},
        "JSON schema 800 levels (over)": {**base, "structured_outputs": {"json": deep_schema}},
    }
    built: list[tuple[str, bytes | list[bytes]]] = [
        (name, json.dumps(body).encode()) for name, body in bodies.items()
    ]
    # the deepest schema accepted, in 1,000 versions sent in turn: the gateway caches a schema's
    # verdict by its text, so an attacker would send a new one each time
    schemas = [
        json.dumps({**base, "structured_outputs": {"json": nested_schema(levels, f"t{k}")}}).encode()
        for k in range(1000)
    ]
    built.insert(4, (f"JSON schema {levels} levels", schemas))
    return built


def nested_schema(levels: int, title: str = "") -> str:
    """A JSON schema's text: objects `levels` deep, each with one property."""
    top = f'{{"title":"{title}",' if title else "{"
    return (
        top
        + '"type":"object","properties":{"a":'
        + '{"type":"object","properties":{"a":' * (levels - 1)
        + ('{"type":"integer"}' + "}}" * levels)
    )


def _oversized_head(spec: AttackSpec) -> bytes:
    host = spec.url.removeprefix("http://")
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {spec.limits.max_request_bytes * 12}\r\n\r\n"
    ).encode()


def _send_oversized(spec: AttackSpec) -> int:
    """A head announcing a body over the limit; the gateway answers (413) without reading it."""
    host, port = spec.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(_oversized_head(spec))
        reply = sock.recv(4096)
    return int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/") else 0


def _attack(spec: AttackSpec, ready, stop, results) -> None:
    """The hostile client's loop (its own process): every body in turn until `stop` is set;
    `ready` is set once its bodies are built and the first one is about to go."""
    import httpx

    bodies = attack_bodies(spec)
    sent: list[tuple[str, int, float]] = []
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=spec.url, timeout=600) as client:
        ready.set()
        while not stop.is_set():
            for name, body in bodies:
                if isinstance(body, list):
                    body = body[len(sent) % len(body)]
                started = time.monotonic()
                status = client.post("/v1/completions", content=body, headers=headers).status_code
                sent.append((name, status, time.monotonic() - started))
            started = time.monotonic()
            sent.append(("Content-Length over (unread)", _send_oversized(spec), time.monotonic() - started))
    results.put(sent)


async def _stream(client, i: int, output_len: int) -> float:
    """One normal stream; its TTFT."""
    body = {
        "prompt": f"def f{i}(x):",
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }
    sent = time.perf_counter()
    ttft = None
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
        async for line in reply.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                event = json.loads(line[6:])
                if any(c.get("token_ids") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - sent
    if ttft is None:
        raise RuntimeError("the stream ended without a token")
    return ttft


async def run_wave(url: str, streams: int, output_len: int) -> Wave:
    import httpx

    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(_stream(client, i, output_len) for i in range(streams)), return_exceptions=True
        )
        total = time.perf_counter() - started
    ttfts = [r for r in results if isinstance(r, float)]
    return Wave(ttfts, total, len(results) - len(ttfts))


def _served_max_model_len(url: str) -> int:
    import httpx

    return int(httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["max_model_len"])


def run(url: str, args: argparse.Namespace) -> tuple[list[Wave], Wave, list[tuple[str, int, float]]]:
    """Warm-up, the wave alone, the wave beside the attacker, the wave alone again (so that a
    machine getting busier or quieter meanwhile biases neither side); returns
    ([alone before, alone after], attacked, the attacker's requests)."""
    limits = RequestLimits(
        max_n=args.max_n,
        max_stop_strings=args.max_stop_strings,
        max_stop_chars=args.max_stop_chars,
        max_request_bytes=args.max_request_bytes,
        max_json_depth=args.max_json_depth,
    )
    spec = AttackSpec(url, _served_max_model_len(url), limits, args.attack_tokens)
    asyncio.run(run_wave(url, min(args.streams, 8), args.output_len))  # warm-up
    alone = asyncio.run(run_wave(url, args.streams, args.output_len))
    context = multiprocessing.get_context("spawn")
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    attacker = context.Process(target=_attack, args=(spec, ready, stop, results), daemon=True)
    attacker.start()
    if not ready.wait(timeout=120):
        raise RuntimeError("the attacker process did not start")
    time.sleep(args.attack_lead)  # the attack is under way before the normal streams start
    attacked = asyncio.run(run_wave(url, args.streams, args.output_len))
    stop.set()
    attacks = results.get(timeout=600)
    attacker.join(timeout=60)
    after = asyncio.run(run_wave(url, args.streams, args.output_len))
    return [alone, after], attacked, attacks


def _wave_line(label: str, wave: Wave) -> str:
    return (
        f"{label:<15}TTFT p50 {wave.ttft_p50:.3f} s, p99 {wave.ttft_p99:.3f} s, total {wave.total:.2f} s, "
        f"failed {wave.failed}"
    )


def report(
    args: argparse.Namespace, alone: list[Wave], attacked: Wave, attacks: list[tuple[str, int, float]]
) -> str:
    """The waves, the ratio line (attacked over the mean of the alone waves' figures) and the
    attacks' answers."""

    def mean(figure) -> float:
        return sum(figure(w) for w in alone) / len(alone)

    p50, p99, total = mean(lambda w: w.ttft_p50), mean(lambda w: w.ttft_p99), mean(lambda w: w.total)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"{args.streams} normal streams x {args.output_len} tokens (greedy, ignore_eos), all at once; "
        f"load average {load} at the end",
        _wave_line("alone, before:", alone[0]),
        _wave_line("with attacker:", attacked),
        _wave_line("alone, after:", alone[1]),
        f"ratio (with attacker / alone): TTFT p50 {attacked.ttft_p50 / p50:.2f}x, "
        f"TTFT p99 {attacked.ttft_p99 / p99:.2f}x, total {attacked.total / total:.2f}x",
        "attacker's requests (name: count, statuses, mean seconds):",
    ]
    by_name: dict[str, list[tuple[int, float]]] = {}
    for name, status, seconds in attacks:
        by_name.setdefault(name, []).append((status, seconds))
    for name, items in by_name.items():
        statuses = ",".join(str(s) for s in sorted({s for s, _ in items}))
        mean = sum(t for _, t in items) / len(items)
        lines.append(f"  {name}: {len(items)}, HTTP {statuses}, {mean:.2f} s")
    return "\n".join(lines)


def docs_section(text: str, args: argparse.Namespace) -> str:
    return f"""{BEGIN}
## Hostile client (`python -m pagedserve.bench.hostile_bench`)

{args.streams} concurrent streaming completions, alone and while one client (its own process)
keeps sending the largest requests the gateway's default limits allow, and ones just past them.
Bundled model, `pagedserve up` with {args.num_kv_blocks} KV blocks; one run on the shared 2-core
machine (other jobs' load moves the alone waves by 2x, hence one before and one after the attack):
the ratio is the result, not an assertion. The attacker's accepted asks are real work on the same
two cores (n = 128 choices of {args.attack_tokens} tokens, a full-context prefill), so some of any
slowdown is the model's share, not the gateway's:

```
{text}
```
{END}"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pagedserve.common.models import default_model

    defaults = RequestLimits()
    parser.add_argument("--url", default=None, help="a running gateway's HTTP URL; default: start a stack")
    parser.add_argument("--model", default=default_model(), help="without --url: the model to serve")
    parser.add_argument("--num-kv-blocks", type=int, default=1024, help="without --url: KV pool blocks")
    parser.add_argument("--max-model-len", type=int, default=512, help="without --url: the stack's limit")
    parser.add_argument("--streams", type=int, default=200, help="concurrent normal streams per wave")
    parser.add_argument("--output-len", type=int, default=8, help="tokens per normal stream")
    parser.add_argument("--attack-tokens", type=int, default=8, help="max_tokens of each max-n choice")
    parser.add_argument("--attack-lead", type=float, default=1.0, help="seconds the attack runs first")
    parser.add_argument("--max-n", type=int, default=defaults.max_n)
    parser.add_argument("--max-stop-strings", type=int, default=defaults.max_stop_strings)
    parser.add_argument("--max-stop-chars", type=int, default=defaults.max_stop_chars)
    parser.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes)
    parser.add_argument("--max-json-depth", type=int, default=defaults.max_json_depth)
    parser.add_argument("--docs", default=None, help="also write the result as a section of this file")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pagedserve.bench.stack import LaunchedStack, StackConfig

    started = time.monotonic()
    if args.url:
        alone, attacked, attacks = run(args.url, args)
    else:
        config = StackConfig(args.model, args.num_kv_blocks, max_model_len=args.max_model_len)
        with LaunchedStack(config) as stack:
            alone, attacked, attacks = run(stack.http_url, args)
    text = report(args, alone, attacked, attacks)
    print(text)
    print(f"({time.monotonic() - started:.0f} s in all)")
    if args.docs:
        docs = Path(args.docs)
        old = docs.read_text() if docs.exists() else "# Benchmarks\n"
        docs.write_text(replace_section(old, docs_section(text, args)))
    return 0 if attacked.failed == 0 and all(w.failed == 0 for w in alone) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pagedserve.bench.hostile_bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))


def replace_section(text: str, section: str) -> str:
    """`text` with its hostile section replaced by `section`, or `section` appended."""
    return doc_sections.replace_section(text, "hostile", section)


def existing_section(text: str) -> str | None:
    return doc_sections.existing_section(text, "hostile")
