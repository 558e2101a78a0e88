"""Throughput with recompute vs swap preemption, under a pool too small for the load.

    python -m pagedserve.bench.swap_bench [--model M] [--blocks 48] [--requests 24] [--n 4]

One `pagedserve up` per mode on the same trace, every request sent at once: parallel-sampling
requests (n choices, seeded, each choice `--output-len` tokens) on prompts of `--prompt-len`
random token ids, through a pool of `--blocks` blocks that holds a fraction of them. With
recompute a preempted group computes its prompt and every choice's outputs again (the prefix
cache only keeps full blocks that were not evicted meanwhile); with swap its KV goes to the
executor's CPU blocks (`--swap-space`) and comes back. Reported per mode: output tok/s (every
choice's tokens over the wall time from the first request sent to the last answer), wall time,
steps, prefill tokens computed (prompt tokens looked up in the prefix cache and not found there:
a recompute's extra work shows here), preemptions and blocks swapped, and whether both runs gave
the same texts (they must). One run; the machine is shared, so the step and prefill counts are
the steadier figures, the wall-clock ratio moves with the machine's load. Raw figures: bench/results/bench_swap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx

from pagedserve.bench.loadgen import parse_metrics
from pagedserve.bench.stack import LaunchedStack, StackConfig
from pagedserve.common.models import default_model

VOCAB = 4096


def trace(requests: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(prompt_len)] for _ in range(requests)]


async def run_load(
    url: str, prompts: list[list[int]], n: int, output_len: int
) -> tuple[float, list[list[str]]]:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:

        async def one(i: int, prompt: list[int]) -> list[str]:
            body = {
                "prompt": prompt,
                "max_tokens": output_len,
                "n": n,
                "temperature": 0.8,
                "seed": 1000 + i,
                "ignore_eos": True,
            }
            reply = await client.post("/v1/completions", json=body)
            reply.raise_for_status()
            return [c["text"] for c in sorted(reply.json()["choices"], key=lambda c: c["index"])]

        t0 = time.perf_counter()
        texts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return time.perf_counter() - t0, list(texts)


def run_mode(args: argparse.Namespace, mode: str, prompts: list[list[int]]) -> dict:
    config = StackConfig(
        model=args.model,
        num_kv_blocks=args.blocks,
        max_model_len=args.max_model_len,
        extra_args=("--preemption-mode", mode, "--swap-space", str(args.swap_space)),
    )
    with LaunchedStack(config) as stack:
        warm = trace(2, 8, seed=99)
        asyncio.run(run_load(stack.http_url, warm, 1, 4))
        before = parse_metrics(httpx.get(f"{stack.http_url}/metrics").text)
        wall, texts = asyncio.run(run_load(stack.http_url, prompts, args.n, args.output_len))
        after = parse_metrics(httpx.get(f"{stack.http_url}/metrics").text)

    def delta(name: str) -> int:
        return int(after.get(name, 0) - before.get(name, 0))

    tokens = len(prompts) * args.n * args.output_len
    return {
        "mode": mode,
        "wall_s": round(wall, 2),
        "output_tok_s": round(tokens / wall, 1),
        "steps": delta("pagedserve_steps_total"),
        # prompt tokens (and, for a recompute, earlier outputs) computed rather than served from the cache
        "prefill_computed": delta("pagedserve_prefix_cache_query_tokens_total")
        - delta("pagedserve_prefix_cache_hit_tokens_total"),
        "preemptions": delta("pagedserve_preemptions_total"),
        "swap_out_blocks": delta("pagedserve_swap_out_blocks_total"),
        "swap_in_blocks": delta("pagedserve_swap_in_blocks_total"),
        "texts": texts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--blocks", type=int, default=48, help="KV blocks of 16 tokens (the small pool)")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--n", type=int, default=4, help="choices per request")
    parser.add_argument("--prompt-len", type=int, default=160)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--swap-space", type=float, default=0.25, help="GiB of CPU blocks for the swap run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/bench_swap.json")
    args = parser.parse_args(argv)
    prompts = trace(args.requests, args.prompt_len, args.seed)
    runs = [run_mode(args, mode, prompts) for mode in ("recompute", "swap")]
    same = runs[0]["texts"] == runs[1]["texts"]
    ratio = runs[1]["output_tok_s"] / runs[0]["output_tok_s"]
    columns = {
        "tok/s": "output_tok_s",
        "wall s": "wall_s",
        "steps": "steps",
        "prefill": "prefill_computed",
        "preempt": "preemptions",
        "swap out": "swap_out_blocks",
        "swap in": "swap_in_blocks",
    }
    print(f"{'mode':<10}" + "".join(f"{title:>9}" for title in columns))
    for r in runs:
        print(f"{r['mode']:<10}" + "".join(f"{r[key]:>9}" for key in columns.values()))
    print(f"swap / recompute throughput: {ratio:.2f}x; same texts: {same}")
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": [{k: v for k, v in r.items() if k != "texts"} for r in runs],
        "ratio_swap_over_recompute": round(ratio, 3),
        "same_texts": same,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
